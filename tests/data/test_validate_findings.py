"""Validation findings show the offending value as the user wrote it, not a dataframe repr."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lorafleet.data.validate import _value, validate_file
from lorafleet.fleet import DataRules

SEED = Path(__file__).resolve().parents[2] / "examples" / "data" / "job-analyzer" / "seed.jsonl"


def test_a_too_short_message_shows_its_length_as_a_number(tmp_path: Path) -> None:
    # Given the first shipped seed twice: as it is, and with an empty then a one-letter answer
    record = json.loads(SEED.read_text(encoding="utf-8").splitlines()[0])
    lines = [json.dumps(record)]
    for i, content in enumerate(["", "a"]):
        record = {**record, "id": f"short-{i}"}
        record["messages"] = [*record["messages"][:-1], {"role": "assistant", "content": content}]
        lines.append(json.dumps(record))
    data = tmp_path / "short.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # When it is validated with a 5-character minimum
    report = validate_file(data, "job-analyzer", DataRules(min_chars=5))
    # Then each finding ends with the plain length
    details = {f.line: f.detail for f in report.failures}
    assert details, "expected findings for lines 2 and 3"
    assert details[2].endswith("(got 0)") and details[3].endswith("(got 1)")
    assert not any("np." in d for d in details.values())


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (np.int64(0), " (got 0)"),
        (np.float64(1.5), " (got 1.5)"),
        (np.str_("card"), " (got 'card')"),
        (None, " (got nothing)"),
        (float("nan"), " (got nothing)"),
        ("x" * 200, f" (got {repr('x' * 200)[:120]}...)"),
    ],
)
def test_values_read_naturally(value: object, shown: str) -> None:
    assert _value({"cell": value}, "cell") == shown


def test_a_rule_without_a_column_shows_no_value() -> None:
    assert _value({"cell": 1}, None) == ""
