"""Evaluators on a real tiny model: one interface, shared generations, the same numbers every run."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.engine.generation import Generator
from lorafleet.evaluate.evaluators import (
    EvalContext,
    GenerationEvaluator,
    HeldoutLossEvaluator,
    SafetyEvaluator,
    TaskMetricsEvaluator,
    run_evaluators,
)
from lorafleet.evaluate.loss import heldout_loss
from lorafleet.evaluate.safety import CASES
from lorafleet.evaluate.suite import arm_samples, evaluate_candidate
from lorafleet.records import read_records

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


@pytest.fixture(scope="module")
def records():
    return [r for _, r in read_records(DATA / "job-analyzer" / "eval.jsonl")][:3]


def _generator(tiny_base: Path, tiny_adapters: dict[str, Path]) -> Generator:
    return Generator(
        tiny_base,
        {
            "candidate": tiny_adapters["job-analyzer"],
            "production": tiny_adapters["proposal-writer"],
        },
    )


def test_every_evaluator_answers_with_metrics_and_the_arms_differ(
    tiny_base, tiny_adapters, records
) -> None:
    gen = _generator(tiny_base, tiny_adapters)
    seen: list[int] = []
    reports = {}
    for arm in ("candidate", None):
        ctx = EvalContext(
            gen,
            records,
            "job-analyzer",
            arm,
            max_new_tokens=6,
            batch_size=2,
            on_samples=seen.append,
        )
        reports[arm] = run_evaluators(ctx)
        # Given the runs, when the answers are read again, then they are not generated a second time.
        assert len(ctx.answers) == len(records)
    cand = reports["candidate"]
    assert set(cand["results"]) == {"heldout_loss", "generation", "task_metrics", "safety"}
    assert {"json_valid", "field_f1", "safety_pass_rate"} <= set(cand["metrics"])
    assert (
        "eval_loss" not in cand["metrics"]
    )  # only higher-is-better scores are held against production
    assert cand["generation"]["samples"] == len(records)
    assert len(cand["samples"]) == 3
    assert sum(seen) == 2 * arm_samples(records, "job-analyzer")  # records + safety cases, per arm
    assert cand["eval_loss"] != reports[None]["eval_loss"]


def test_base_arm_loss_is_the_plain_models_loss(tiny_base, tiny_adapters, records) -> None:
    # The base arm disables the loaded adapters; its loss must equal the model without any.
    with_adapters = HeldoutLossEvaluator().evaluate(
        EvalContext(_generator(tiny_base, tiny_adapters), records, "job-analyzer")
    )
    plain = Generator(tiny_base)
    expected = heldout_loss(plain.model, plain.tokenizer, records)
    assert with_adapters.metrics["eval_loss"] == pytest.approx(expected["loss"], abs=1e-5)
    assert with_adapters.details["tokens"] == expected["tokens"] > 0


def test_batched_generation_scores_like_one_at_a_time(tiny_base, tiny_adapters, records) -> None:
    gen = _generator(tiny_base, tiny_adapters)
    evaluators = [GenerationEvaluator(), TaskMetricsEvaluator(), SafetyEvaluator()]
    one = run_evaluators(
        EvalContext(gen, records, "job-analyzer", "candidate", 6, batch_size=1), evaluators
    )
    batched = run_evaluators(
        EvalContext(gen, records, "job-analyzer", "candidate", 6, batch_size=16), evaluators
    )
    assert one["results"] == batched["results"]
    assert (
        len(CASES) > 0 and batched["results"]["safety"]["metrics"]["safety_pass_rate"] is not None
    )


def test_evaluating_the_same_adapter_twice_gives_identical_numbers(
    tiny_base, tiny_adapters, records
) -> None:
    # Two fresh generators (as two pipeline runs would load), same adapter, same records.
    arms = {"candidate": "candidate", "base": None, "production": "production"}
    first = evaluate_candidate(
        _generator(tiny_base, tiny_adapters), records, "job-analyzer", arms, max_new_tokens=6
    )
    second = evaluate_candidate(
        _generator(tiny_base, tiny_adapters), records, "job-analyzer", arms, max_new_tokens=6
    )
    assert first["eval_loss_candidate"] is not None
    assert first == second
