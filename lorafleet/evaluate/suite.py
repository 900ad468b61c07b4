"""Evaluate a candidate adapter against its baselines (the base model and production).

One :class:`~lorafleet.engine.generation.Generator` holds the base with the candidate (and the
production adapter, when there is one) loaded; every arm runs the same evaluators on the
same records, and the optional pairwise judge compares the candidate's answers with the
reference arm's: production when there is one, else the base model. Greedy decoding, a
fixed torch seed and a seeded bootstrap make the numbers the same on every run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lorafleet.chat import prompt_messages
from lorafleet.evaluate.evaluators import EvalContext, Evaluator, run_evaluators
from lorafleet.evaluate.safety import safety_cases
from lorafleet.fleet.tasks import TaskDefinition
from lorafleet.records import Record

__all__ = ["arm_samples", "evaluate_candidate"]


def arm_samples(records: Sequence[Record], task: TaskDefinition | str) -> int:
    """Generations one arm makes: one per record plus one per safety case (for progress bars)."""
    return len(records) + len(safety_cases(task))


def evaluate_candidate(
    generator,
    records: Sequence[Record],
    task: TaskDefinition | str,
    arms: dict[str, str | None],
    max_new_tokens: int = 96,
    judge=None,
    evaluators: Sequence[Evaluator] | None = None,
    on_samples: Callable[[str, int], None] | None = None,
    on_judged: Callable[[], None] | None = None,
) -> dict:
    """Run the evaluators on every arm, then the judge, if one is given.

    Args:
        generator: a :class:`~lorafleet.engine.generation.Generator` with the arms' adapters loaded.
        records: the held-out records.
        task: the expert's task definition (a name means the shipped task).
        arms: arm name -> adapter name in ``generator`` (``None`` for the base model); must
            include ``"candidate"``.
        max_new_tokens: generation budget per answer.
        judge: a :class:`~lorafleet.fleet.GateJudge`, or ``None`` for no judge.
        evaluators: the evaluators (default: :func:`~lorafleet.evaluate.evaluators.default_evaluators`).
        on_samples: progress: called as ``on_samples(arm, n)`` after each generation batch.
        on_judged: progress: called after each judged item.

    Returns:
        Flat keys per arm (``eval_loss_<arm>``, ``perplexity_<arm>``, ``metrics_<arm>``,
        ``generation_<arm>``, ``safety_failures_<arm>``, ``samples_<arm>``, ``results_<arm>``),
        ``eval_tokens`` and ``judge`` (the judge's result or ``None``).
    """
    import torch

    from lorafleet.evaluate.judge import JudgeClient, judge_pairwise

    # Made first: a judge key that is missing fails the step before any answer is generated.
    client = (
        JudgeClient(judge.base_url, judge.model, judge.api_key_env) if judge is not None else None
    )
    torch.manual_seed(0)
    contexts = {
        who: EvalContext(
            generator,
            records,
            task,
            adapter,
            max_new_tokens,
            on_samples=(lambda n, who=who: on_samples(who, n)) if on_samples else None,
        )
        for who, adapter in arms.items()
    }
    report: dict = {"judge": None}
    for who, ctx in contexts.items():
        arm = run_evaluators(ctx, evaluators)
        report["eval_tokens"] = arm["eval_tokens"]
        for key in (
            "eval_loss",
            "perplexity",
            "metrics",
            "generation",
            "safety_failures",
            "samples",
            "results",
        ):
            report[f"{key}_{who}"] = arm[key]
    if client is not None:
        reference = "production" if "production" in contexts else "base"
        n = judge.max_items or len(records)
        result = judge_pairwise(
            client.complete,
            [prompt_messages(r.messages) for r in records[:n]],
            [a.text for a in contexts["candidate"].answers[:n]],
            [a.text for a in contexts[reference].answers[:n]],
            judge.confidence,
            judge.resamples,
            on_item=on_judged,
        )
        report["judge"] = {**result, "reference": reference, "model": judge.model}
    return report
