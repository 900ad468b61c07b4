"""Task metrics: the gold answer scores full marks; broken answers score zero."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.evaluate.metrics import PRIMARY_METRIC, score, task_metrics
from lorafleet.records import read_records

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
TASKS = ["job-analyzer", "candidate-evaluator", "proposal-writer", "profile-reviewer", "job-post-writer"]


def _eval(task: str):
    return [r for _, r in read_records(DATA / task / "eval.jsonl")]


@pytest.mark.parametrize("task", TASKS)
def test_gold_answers_score_full_marks(task: str) -> None:
    records = _eval(task)
    gold = [r.messages[-1].content for r in records]
    metrics = task_metrics(task, gold, records)
    assert metrics["token_f1"] == 1.0
    assert metrics[PRIMARY_METRIC[task]] == 1.0


@pytest.mark.parametrize("task", TASKS)
def test_an_off_task_answer_scores_zero_on_the_primary_metric(task: str) -> None:
    records = _eval(task)
    metrics = task_metrics(task, ["sure, sounds good"] * len(records), records)
    assert metrics[PRIMARY_METRIC[task]] == 0.0
    assert metrics["token_f1"] < 0.1


def test_job_analyzer_partial_credit_for_skills() -> None:
    record = _eval("job-analyzer")[0]
    import json

    gold = json.loads(record.messages[-1].content)
    half = {**gold, "skills": gold["skills"][: max(1, len(gold["skills"]) // 2)]}
    m = score("job-analyzer", json.dumps(half), record)
    assert m["json_valid"] == m["schema_valid"] == 1.0
    assert 0.0 < m["skills_f1"] < 1.0


def test_proposal_with_contact_details_is_flagged() -> None:
    record = _eval("proposal-writer")[0]
    assert score("proposal-writer", record.messages[-1].content + " Email me at a@b.co", record)["no_contact"] == 0.0
