"""The JSONL reader: every malformed line is one DataError naming file, line and rule.

The full catalogue of malformed inputs runs through the CLI in tests/data/test_malformed.py;
these tests pin the reader's own contract (line numbers, limits, gzip, round trips).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lorafleet.errors import DataError
from lorafleet.records import Record, dump_records, iter_records, parse_record, read_records

OK = {
    "id": "r1",
    "task": "job-analyzer",
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    "source": "human",
    "meta": {},
}


def _write(path: Path, *lines: str | bytes) -> Path:
    path.write_bytes(
        b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines)
    )
    return path


@pytest.mark.parametrize(
    ("line", "rule", "detail"),
    [
        ("{not json", "json", "Expecting property name"),
        ("[1, 2]", "not-an-object", "got list"),
        (json.dumps({k: v for k, v in OK.items() if k != "task"}), "missing-field", "task"),
        (json.dumps({**OK, "extra": 1}), "unknown-field", "extra"),
        (
            json.dumps({**OK, "messages": [{"role": "robot", "content": "x"}]}),
            "unknown-role",
            "messages.0.role",
        ),
        (json.dumps({**OK, "source": "scraped"}), "unknown-source", "source"),
        (json.dumps({**OK, "task": "Poet Writer"}), "bad-task-name", "task 'Poet Writer'"),
        (json.dumps({**OK, "messages": "hello"}), "wrong-type", "messages"),
    ],
)
def test_malformed_line_is_reported_with_its_line(
    tmp_path: Path, line: str, rule: str, detail: str
) -> None:
    path = _write(tmp_path / "d.jsonl", json.dumps(OK), line)
    with pytest.raises(DataError) as err:
        read_records(path)
    assert (err.value.file, err.value.line, err.value.rule) == (str(path), 2, rule)
    assert detail in err.value.detail


def test_line_numbers_count_blank_lines_and_crlf_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(f"\r\n{json.dumps(OK)}\r\n\r\n{json.dumps({**OK, 'id': 'r2'})}\r\n".encode())
    assert [(n, r.id) for n, r in read_records(path)] == [(2, "r1"), (4, "r2")]


def test_line_limit_is_a_parameter(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "d.jsonl",
        json.dumps(OK),
        json.dumps({**OK, "id": "r2", "meta": {"x": "y" * 300}}),
    )
    assert len(read_records(path)) == 2
    with pytest.raises(DataError) as err:
        read_records(path, max_line_bytes=256)
    assert (err.value.line, err.value.rule) == (2, "line-too-long")


def test_gzip_and_blank_lines_round_trip(tmp_path: Path) -> None:
    rec = Record.model_validate(OK)
    plain = dump_records(tmp_path / "d.jsonl", [rec, rec.model_copy(update={"id": "r2"})])
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes() + b"\n"))
    assert [(n, r.id) for n, r in read_records(gz)] == [(1, "r1"), (2, "r2")]


def test_a_broken_gzip_file_is_one_error(tmp_path: Path) -> None:
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress((json.dumps(OK) + "\n").encode() * 50)[:40])
    with pytest.raises(DataError) as err:
        read_records(gz)
    assert err.value.rule == "gzip"


def test_reading_is_streaming(tmp_path: Path) -> None:
    # The first record arrives before a later broken line is read.
    path = _write(tmp_path / "d.jsonl", json.dumps(OK), "{broken")
    it = iter_records(path)
    assert next(it)[1].id == "r1"
    with pytest.raises(DataError, match=":2: json:"):
        next(it)


def test_parse_record_names_the_rule_without_a_place() -> None:
    with pytest.raises(DataError) as err:
        parse_record('{"id": "a", "id": "b"}')
    assert (err.value.rule, err.value.line) == ("duplicate-key", None)
    assert parse_record(json.dumps(OK)).id == "r1"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing-file"):
        read_records(tmp_path / "nope.jsonl")
