"""An expert's outcome travels as a pipeline parameter: it must stay small however long the
answers and the training run, or the step's command line cannot hold the fleet's outcomes."""

from __future__ import annotations

import json

from lorafleet.stages import OUTCOME_LOSS_POINTS, OUTCOME_SAMPLE_CHARS, outcome_of, reject_stage


def _report(sample_chars: int, steps: int) -> dict:
    sample = "word " * (sample_chars // 5)
    return {
        "expert": "job-analyzer",
        "probe": [{"role": "user", "content": "hi"}],
        "metrics_candidate": {"json_valid": 0.5},
        "samples_candidate": [sample] * 3,
        "samples_base": [sample] * 3,
        "results_candidate": {"generation": {"details": {"samples": [sample] * 3}}},
        "results_base": {"generation": {"details": {"samples": [sample] * 3}}},
        "train": {"steps": steps, "losses": [3.0 - i / steps for i in range(steps)]},
        "gate_passed": False,
    }


def test_a_long_run_with_long_answers_gives_a_bounded_outcome() -> None:
    small = json.dumps(outcome_of(_report(100, 50)))
    big = outcome_of(_report(50_000, 20_000))
    assert len(json.dumps(big)) < 12_000  # twenty experts fit in one 128 KiB argument
    assert not any(k.startswith("results_") for k in big) and "samples_base" not in big
    assert all(len(s) == OUTCOME_SAMPLE_CHARS for s in big["samples_candidate"])
    losses = big["train"]["losses"]
    assert len(losses) == OUTCOME_LOSS_POINTS and big["train"]["loss_points_of"] == 20_000
    assert losses[0] == 3.0 and losses[-1] == 3.0 - 19_999 / 20_000
    # a short run keeps every point, and what the fleet report reads is all there
    short = json.loads(small)
    assert len(short["train"]["losses"]) == 50 and short["probe"] and short["metrics_candidate"]
    assert reject_stage(_report(100, 50))["registered"] is False
