"""The great-expectations suites: shipped data passes; critical vs warning; task suites; reports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lorafleet.data.report import validation_html, validation_markdown
from lorafleet.data.validate import validate_file, validate_records
from lorafleet.errors import DataError
from lorafleet.fleet import DataRules, load_fleet
from lorafleet.records import Record, read_records

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _rec(i: int, **over) -> dict:
    answer = {
        "skills": ["React"],
        "deliverables": [],
        "budget": {"type": "hourly", "min": None, "max": None, "currency": "USD"},
        "timeline": None,
        "open_questions": [],
    }
    rec = {
        "id": f"r{i}",
        "task": "job-analyzer",
        "messages": [
            {"role": "system", "content": "Analyze the post."},
            {"role": "user", "content": f"Need a React dev, job {i}."},
            {"role": "assistant", "content": json.dumps(answer)},
        ],
        "source": "human",
        "meta": {},
    }
    rec.update(over)
    return rec


def _file(tmp_path: Path, *recs: dict) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_shipped_data_passes_every_suite_without_warnings() -> None:
    spec = load_fleet(EXAMPLES / "fleet.yaml")
    for e in spec.experts:
        for path in (e.seed_data, e.eval_data):
            report = validate_file(path, e.task, e.data)
            assert report.rows >= 15
            assert report.success, report.lines()
            assert report.warnings == [], report.warning_lines()
            assert report.pii == {}


def test_task_suites_add_their_own_expectations() -> None:
    spec = load_fleet(EXAMPLES / "fleet.yaml")
    rules = {
        e.task: {x["rule"] for x in validate_file(e.eval_data, e.task, e.data).expectations}
        for e in spec.experts
    }
    assert {"answer-not-json", "answer-schema"} <= rules["job-analyzer"]
    assert {"answer-not-json", "answer-schema", "reference-ranking_valid"} <= rules[
        "candidate-evaluator"
    ]
    assert not rules["proposal-writer"] & {"answer-not-json", "reference-ranking_valid"}


def test_warnings_do_not_fail_a_file(tmp_path: Path) -> None:
    # Given the same conversation under two ids and a second system prompt
    other_system = _rec(3)
    other_system["messages"] = [
        {"role": "system", "content": "Be terse."},
        *other_system["messages"][1:],
    ]
    twin = _rec(4)
    twin["messages"] = _rec(1)["messages"]
    report = validate_file(_file(tmp_path, _rec(1), _rec(2), other_system, twin), "job-analyzer")
    # Then the file passes, with both warnings listed
    assert report.success and report.failures == []
    assert {(w.line, w.rule) for w in report.warnings} == {
        (1, "duplicate-content"),
        (4, "duplicate-content"),
        (0, "system-prompt-varies"),
    }
    severities = {e["rule"]: (e["severity"], e["success"]) for e in report.expectations}
    assert severities["duplicate-content"] == ("warning", False)
    assert severities["role-order"] == ("critical", True)


def test_pii_policy_sets_the_severity(tmp_path: Path) -> None:
    leaky = _rec(2)
    leaky["messages"][1] = {
        "role": "user",
        "content": "Card 4111 1111 1111 1111, mail bo@example.org",
    }
    path = _file(tmp_path, _rec(1), leaky)
    scrub = validate_file(path, "job-analyzer", DataRules(pii="scrub"))
    reject = validate_file(path, "job-analyzer", DataRules(pii="reject"))
    off = validate_file(path, "job-analyzer", DataRules(pii="off"))
    assert scrub.success and [w.rule for w in scrub.warnings] == ["pii"]
    assert not reject.success and reject.lines() == [
        f"{path}:2: pii: personal data or an off-platform request (got 'card,email')"
    ]
    assert "pii" not in {e["rule"] for e in off.expectations}
    assert scrub.pii == reject.pii == {"card": 1, "email": 1}


@pytest.mark.parametrize(
    ("answer", "rule"),
    [
        ("not json", "answer-not-json"),
        (json.dumps({"skills": "React"}), "answer-schema"),
        (
            json.dumps(
                {
                    "skills": ["React"],
                    "deliverables": [],
                    "budget": {"type": "fixed"},
                    "timeline": "",
                    "open_questions": [],
                }
            ),
            "answer-schema",
        ),
    ],
)
def test_job_analyzer_answers_must_match_the_schema(answer: str, rule: str) -> None:
    bad = Record.model_validate(_rec(2))
    bad.messages[-1] = bad.messages[-1].model_copy(update={"content": answer})
    report = validate_records([Record.model_validate(_rec(1)), bad], "job-analyzer")
    assert [(f.line, f.rule) for f in report.failures] == [(2, rule)]


def test_candidate_evaluator_ranks_each_candidate_once() -> None:
    seeds = [r for _, r in read_records(EXAMPLES / "data" / "candidate-evaluator" / "seed.jsonl")]
    answer = json.loads(seeds[0].messages[-1].content)
    answer["ranking"] = answer["ranking"][:-1]  # one candidate left out
    broken = seeds[1].model_copy(
        update={
            "messages": [
                *seeds[1].messages[:-1],
                seeds[1].messages[-1].model_copy(update={"content": json.dumps(answer)}),
            ]
        }
    )
    report = validate_records([seeds[0], broken], "candidate-evaluator")
    assert [(f.line, f.rule) for f in report.failures] == [(2, "reference-ranking_valid")]


def test_failures_raise_one_line_with_a_count(tmp_path: Path) -> None:
    path = _file(tmp_path, _rec(1), _rec(1), _rec(2, task="chat"))
    report = validate_file(path, "job-analyzer")
    with pytest.raises(DataError) as err:
        report.raise_for_failures()
    assert (
        str(err.value)
        == f"{path}:1: duplicate-id: id is used by more than one record (got 'r1') (and 2 more)"
    )


def test_reports_are_self_contained_html_and_markdown(tmp_path: Path) -> None:
    tagged = _rec(1, id="<b>r1</b>")
    bad = _rec(2, messages=[{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}])
    report = validate_file(_file(tmp_path, tagged, tagged, bad), "job-analyzer")
    page = validation_html([report])
    assert page.startswith("<!doctype html>") and "<style>" in page
    assert not re.search(r"(src|href)=|https?://|@import", page)  # nothing loaded from anywhere
    assert "<b>r1" not in page and "&#x27;&lt;b&gt;r1&lt;/b&gt;&#x27;" in page  # data is escaped
    assert "role-order" in page and "FAILED" in page
    md = validation_markdown([report])
    assert "| role-order | critical | FAILED | 1 |" in md and "- line 3: `role-order`" in md
    assert json.loads(json.dumps(report.to_dict()))["failures"][-1]["rule"] == "role-order"
