"""The great-expectations suite: shipped data passes; each rule catches its mistake by line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafleet.data.validate import validate_file
from lorafleet.errors import DataError
from lorafleet.fleet import DataRules, load_fleet

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _rec(i: int, **over) -> dict:
    rec = {
        "id": f"r{i}",
        "task": "job-analyzer",
        "messages": [
            {"role": "system", "content": "Analyze the post."},
            {"role": "user", "content": f"Need a React dev, job {i}."},
            {"role": "assistant", "content": '{"skills": ["React"]}'},
        ],
        "source": "human",
        "meta": {},
    }
    rec.update(over)
    return rec


def _file(tmp_path: Path, bad: dict) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [_rec(1), _rec(2), bad, _rec(4)]))
    return path


def test_shipped_data_passes() -> None:
    spec = load_fleet(EXAMPLES / "fleet.yaml")
    for e in spec.experts:
        for path in (e.seed_data, e.eval_data):
            report = validate_file(path, e.task, e.data)
            assert report.rows >= 15
            assert report.success, report.lines()


USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Hello"}
SYSTEM = {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize(
    ("bad", "rule"),
    [
        (_rec(1), "duplicate-id"),
        (_rec(3, task="proposal-writer"), "wrong-task"),
        (_rec(3, messages=[USER, ASSISTANT, USER]), "role-order"),
        (_rec(3, messages=[USER, SYSTEM, ASSISTANT]), "role-order"),
        (_rec(3, messages=[USER, USER, ASSISTANT]), "role-order"),
        (_rec(3, messages=[ASSISTANT]), "role-order"),
        (_rec(3, messages=[USER, {"role": "assistant", "content": "  \n"}]), "empty-content"),
        (_rec(3, messages=[USER, {"role": "assistant", "content": "x" * 101}]), "content-too-long"),
    ],
)
def test_each_rule_reports_the_bad_line(tmp_path: Path, bad: dict, rule: str) -> None:
    report = validate_file(_file(tmp_path, bad), "job-analyzer", DataRules(max_chars=100))
    assert not report.success
    assert rule in {f.rule for f in report.failures}
    assert 3 in {f.line for f in report.failures if f.rule == rule}
    with pytest.raises(DataError) as err:
        report.raise_for_failures()
    assert str(err.value).startswith(f"{tmp_path / 'd.jsonl'}:")


def test_expectations_are_listed_in_the_report(tmp_path: Path) -> None:
    report = validate_file(_file(tmp_path, _rec(3)), "job-analyzer")
    assert report.success
    assert {e["rule"] for e in report.expectations} >= {"duplicate-id", "role-order", "empty-content"}
    assert "| role-order | ok | 0 |" in report.to_markdown()


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="empty-file"):
        validate_file(tmp_path / "e.jsonl", "job-analyzer")
