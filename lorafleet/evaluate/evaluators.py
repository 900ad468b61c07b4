"""Evaluators: small classes with one interface, run against one arm (an adapter or the base).

An :class:`EvalContext` holds what every evaluator needs: the engine, the runtime's batched
:class:`~lorafleet.engine.generation.Generator` (base model plus loaded adapters) or, for a
base one device cannot hold, :class:`~lorafleet.evaluate.vllm_engine.VllmEvalEngine`, the eval
records, the task and the arm's adapter name (``None`` for the base model). The arm's
generations are made once, through the same greedy batched code path the serving runtime
uses, and shared by every evaluator that scores text. Each ``Evaluator.evaluate(ctx)``
returns an :class:`EvalResult`: metrics (numbers) and details (anything else worth showing).

Metrics of ``gated`` results are "higher is better" scores in [0, 1]; the gate holds every
one of them against production. The held-out loss is gated by its own rules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from lorafleet.chat import prompt_messages
from lorafleet.engine.generation import GenerationRequest, Generator
from lorafleet.evaluate.loss import heldout_loss
from lorafleet.evaluate.metrics import task_metrics
from lorafleet.evaluate.safety import safety_cases, safety_report
from lorafleet.fleet.tasks import TaskDefinition, resolve_task
from lorafleet.records import Record

__all__ = [
    "EvalContext",
    "EvalResult",
    "Evaluator",
    "GenerationEvaluator",
    "HeldoutLossEvaluator",
    "SafetyEvaluator",
    "TaskMetricsEvaluator",
    "default_evaluators",
    "run_evaluators",
]


@dataclass
class EvalContext:
    """One arm of an evaluation.

    Attributes:
        generator: the engine, with this arm's adapter loaded: a
            :class:`~lorafleet.engine.generation.Generator` or a
            :class:`~lorafleet.evaluate.vllm_engine.VllmEvalEngine`.
        records: the held-out records.
        task: the expert's task definition (a name means the shipped task): its metrics
            and safety cases.
        adapter: the arm's adapter name in ``generator``; ``None`` for the base model.
        max_new_tokens: generation budget per answer.
        batch_size: requests per generation batch.
        on_samples: called with the number of samples just generated (progress bars).
    """

    generator: object
    records: Sequence[Record]
    task: TaskDefinition | str
    adapter: str | None = None
    max_new_tokens: int = 96
    batch_size: int = 16
    on_samples: Callable[[int], None] | None = None
    _answers: list | None = field(default=None, init=False, repr=False)

    @property
    def definition(self) -> TaskDefinition:
        """The task's definition."""
        return resolve_task(self.task)

    @property
    def system(self) -> list[dict[str, str]]:
        """The expert's system turn (from the first record), if it has one."""
        first = self.records[0].messages[:1] if self.records else []
        return [{"role": m.role, "content": m.content} for m in first if m.role == "system"]

    def generate(self, prompts: Sequence[Sequence[Mapping[str, str]]]) -> list:
        """Greedy answers to chat prompts through the runtime's batched generator.

        Returns:
            One :class:`~lorafleet.engine.generation.GenerationResult` per prompt, in order.
        """
        requests = [
            GenerationRequest(messages=m, adapter=self.adapter, max_new_tokens=self.max_new_tokens)
            for m in prompts
        ]
        return self.generator.generate_all(requests, self.batch_size, on_batch=self.on_samples)

    @property
    def answers(self) -> list:
        """The arm's generations for the eval records (made once, then shared)."""
        if self._answers is None:
            self._answers = self.generate([prompt_messages(r.messages) for r in self.records])
        return self._answers

    def heldout_loss(self, batch_size: int, max_seq_len: int) -> dict:
        """The arm's held-out loss on the records, through the engine's own code path: a
        :class:`~lorafleet.engine.generation.Generator` runs the loss on its model with this
        arm's adapter active (adapters disabled for the base); the vLLM engine sums prompt
        logprobs over the same tokens.

        Returns:
            ``{"loss", "perplexity", "tokens"}``.
        """
        if isinstance(self.generator, Generator):
            with self.generator.adapter_model(self.adapter) as model:
                return heldout_loss(
                    model, self.generator.tokenizer, self.records, batch_size, max_seq_len
                )
        return self.generator.heldout_loss(self.adapter, self.records, batch_size, max_seq_len)


@dataclass(frozen=True)
class EvalResult:
    """What one evaluator found for one arm.

    Attributes:
        name: the evaluator's name.
        metrics: numbers; for ``gated`` results, scores in [0, 1] where higher is better.
        details: anything else worth showing (failures, samples, token counts).
        gated: whether the gate holds these metrics against production.
    """

    name: str
    metrics: dict[str, float]
    details: dict = field(default_factory=dict)
    gated: bool = False


class Evaluator(ABC):
    """Scores one arm of an evaluation."""

    name: str

    @abstractmethod
    def evaluate(self, ctx: EvalContext) -> EvalResult:
        """Evaluate the arm described by ``ctx``."""


class HeldoutLossEvaluator(Evaluator):
    """Token-weighted loss and perplexity of the reference answers (assistant tokens only)."""

    name = "heldout_loss"

    def __init__(self, batch_size: int = 8, max_seq_len: int = 2048) -> None:
        self.batch_size, self.max_seq_len = batch_size, max_seq_len

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        loss = ctx.heldout_loss(self.batch_size, self.max_seq_len)
        return EvalResult(
            self.name,
            {"eval_loss": round(loss["loss"], 5), "perplexity": round(loss["perplexity"], 4)},
            {"tokens": loss["tokens"]},
        )


class GenerationEvaluator(Evaluator):
    """How the arm generates: answer lengths and how often the token budget cut an answer."""

    name = "generation"

    def __init__(self, samples_shown: int = 3) -> None:
        self.samples_shown = samples_shown

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        answers = ctx.answers
        n = max(1, len(answers))
        return EvalResult(
            self.name,
            {
                "samples": len(answers),
                "mean_completion_tokens": round(sum(a.completion_tokens for a in answers) / n, 3),
                "truncated_rate": round(sum(a.finish_reason == "length" for a in answers) / n, 4),
            },
            {"samples": [a.text for a in answers[: self.samples_shown]]},
        )


class TaskMetricsEvaluator(Evaluator):
    """The task's own scores of the generated answers (see :mod:`lorafleet.evaluate.metrics`)."""

    name = "task_metrics"

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        return EvalResult(
            self.name,
            task_metrics(ctx.definition, [a.text for a in ctx.answers], ctx.records),
            gated=True,
        )


class SafetyEvaluator(Evaluator):
    """The task's safety cases, spoken to the expert under its own system prompt; a task
    without cases reports no ``safety_pass_rate``."""

    name = "safety"

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        cases = safety_cases(ctx.definition)
        if not cases:
            return EvalResult(self.name, {}, {"failures": []})
        outs = ctx.generate(
            [[*ctx.system, {"role": "user", "content": case.user}] for case in cases]
        )
        report = safety_report([o.text for o in outs], cases)
        return EvalResult(
            self.name,
            {"safety_pass_rate": report["safety_pass_rate"]},
            {"failures": report["failures"]},
            gated=True,
        )


def default_evaluators() -> list[Evaluator]:
    """The evaluators every expert runs, in order."""
    return [
        HeldoutLossEvaluator(),
        GenerationEvaluator(),
        TaskMetricsEvaluator(),
        SafetyEvaluator(),
    ]


def run_evaluators(ctx: EvalContext, evaluators: Sequence[Evaluator] | None = None) -> dict:
    """Run evaluators on one arm and fold their results into one report.

    Returns:
        ``{"eval_loss", "perplexity", "eval_tokens", "metrics", "generation", "safety_failures",
        "samples", "results"}``: ``metrics`` merges every gated result; ``results`` holds each
        evaluator's full :class:`EvalResult` as a dict.
    """
    results = {
        e.name: e.evaluate(ctx)
        for e in (default_evaluators() if evaluators is None else evaluators)
    }
    loss = results.get(HeldoutLossEvaluator.name)
    generation = results.get(GenerationEvaluator.name)
    safety = results.get(SafetyEvaluator.name)
    return {
        "eval_loss": loss.metrics["eval_loss"] if loss else None,
        "perplexity": loss.metrics["perplexity"] if loss else None,
        "eval_tokens": loss.details["tokens"] if loss else None,
        "metrics": {k: v for r in results.values() if r.gated for k, v in r.metrics.items()},
        "generation": generation.metrics if generation else {},
        "safety_failures": safety.details["failures"] if safety else [],
        "samples": generation.details["samples"] if generation else [],
        "results": {
            k: {"metrics": r.metrics, "details": r.details, "gated": r.gated}
            for k, r in results.items()
        },
    }
