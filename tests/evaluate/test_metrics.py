"""Task metrics: the gold answer scores full marks; broken answers score zero."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lorafleet.evaluate.metrics import score, task_metrics
from lorafleet.fleet import shipped_task
from lorafleet.records import read_records

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
TASKS = [
    "job-analyzer",
    "candidate-evaluator",
    "proposal-writer",
    "profile-reviewer",
    "job-post-writer",
]


def _eval(task: str):
    return [r for _, r in read_records(DATA / task / "eval.jsonl")]


@pytest.mark.parametrize("task", TASKS)
def test_gold_answers_score_full_marks(task: str) -> None:
    records = _eval(task)
    gold = [r.messages[-1].content for r in records]
    metrics = task_metrics(task, gold, records)
    assert metrics["token_f1"] == 1.0
    assert metrics[shipped_task(task).primary] == 1.0


@pytest.mark.parametrize("task", TASKS)
def test_an_off_task_answer_scores_zero_on_the_primary_metric(task: str) -> None:
    records = _eval(task)
    metrics = task_metrics(task, ["sure, sounds good"] * len(records), records)
    assert metrics[shipped_task(task).primary] == 0.0
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
    assert (
        score("proposal-writer", record.messages[-1].content + " Email me at a@b.co", record)[
            "no_contact"
        ]
        == 0.0
    )


def test_candidate_ranking_agreement_pairwise_and_ndcg() -> None:
    import json

    record = _eval("candidate-evaluator")[0]
    gold = json.loads(record.messages[-1].content)
    order = [r["candidate"] for r in sorted(gold["ranking"], key=lambda r: r["rank"])]
    assert len(order) == 3

    def ranked(letters: list[str]) -> str:
        return json.dumps(
            {"ranking": [{"candidate": c, "rank": i + 1} for i, c in enumerate(letters)]}
        )

    # Swapping the last two keeps 2 of 3 pairs; NDCG with relevances 2,1,0 drops from 1 to
    # (3 + 0 + 1/log2(4)) / (3 + 1/log2(3)) = 3.5 / 3.6309 (hand-computed).
    swapped = score("candidate-evaluator", ranked([order[0], order[2], order[1]]), record)
    assert swapped["ranking_valid"] == swapped["top1_match"] == 1.0
    assert swapped["pairwise_accuracy"] == pytest.approx(2 / 3)
    assert swapped["ndcg"] == pytest.approx(3.5 / (3 + 1 / math.log2(3)), abs=1e-6)
    reversed_ = score("candidate-evaluator", ranked(order[::-1]), record)
    assert reversed_["pairwise_accuracy"] == 0.0 and reversed_["top1_match"] == 0.0
    # A ranking that leaves a candidate out is invalid and earns no agreement.
    partial = score("candidate-evaluator", ranked(order[:2]), record)
    assert partial["ranking_valid"] == partial["pairwise_accuracy"] == partial["ndcg"] == 0.0


def test_job_analyzer_field_level_precision_and_recall() -> None:
    import json

    record = _eval("job-analyzer")[0]
    gold = json.loads(record.messages[-1].content)
    # Extra invented skills lower precision, not recall; a wrong budget lowers both.
    padded = score(
        "job-analyzer",
        json.dumps({**gold, "skills": gold["skills"] + ["Cobol", "Fortran"]}),
        record,
    )
    assert padded["field_recall"] == 1.0 and padded["field_precision"] < 1.0
    wrong_budget = score(
        "job-analyzer", json.dumps({**gold, "budget": {**gold["budget"], "max": 1}}), record
    )
    assert wrong_budget["field_precision"] < 1.0 and wrong_budget["field_recall"] < 1.0
    assert score("job-analyzer", "not json", record)["field_f1"] == 0.0


def test_proposal_placeholders_and_length_bounds() -> None:
    record = _eval("proposal-writer")[0]
    gold = record.messages[-1].content
    assert score("proposal-writer", gold, record)["no_placeholder"] == 1.0
    for template in (
        "Dear [Client Name],",
        "Hi {{name}}",
        "Regards, <Your Name>",
        "Lorem ipsum dolor",
    ):
        assert score("proposal-writer", gold + "\n" + template, record)["no_placeholder"] == 0.0
    assert score("proposal-writer", "Django and Vue.js, done.", record)["length_ok"] == 0.0
    assert score("proposal-writer", gold + " more" * 400, record)["length_ok"] == 0.0
