"""The JSONL reader: every malformed line is one DataError naming file, line and rule."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lorafleet.errors import DataError
from lorafleet.records import Record, dump_records, read_records

OK = {
    "id": "r1",
    "task": "job-analyzer",
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    "source": "human",
    "meta": {},
}


def _write(path: Path, *lines: str | bytes) -> Path:
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return path


@pytest.mark.parametrize(
    ("line", "rule", "detail"),
    [
        ("{not json", "json", "Expecting property name"),
        ("[1, 2]", "not-an-object", "got list"),
        (json.dumps({k: v for k, v in OK.items() if k != "task"}), "missing-field", "task"),
        (json.dumps({**OK, "extra": 1}), "unknown-field", "extra"),
        (json.dumps({**OK, "messages": [{"role": "robot", "content": "x"}]}), "schema", "messages.0.role"),
        (json.dumps({**OK, "source": "scraped"}), "schema", "source"),
        (json.dumps({**OK, "messages": "hello"}), "schema", "messages"),
    ],
)
def test_malformed_line_is_reported_with_its_line(tmp_path: Path, line: str, rule: str, detail: str) -> None:
    path = _write(tmp_path / "d.jsonl", json.dumps(OK), line)
    with pytest.raises(DataError) as err:
        read_records(path)
    assert (err.value.line, err.value.rule) == (2, rule)
    assert detail in err.value.detail


def test_invalid_utf8(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", b'{"id": "\xff"}')
    with pytest.raises(DataError) as err:
        read_records(path)
    assert (err.value.line, err.value.rule) == (1, "utf8")


def test_gzip_and_blank_lines_round_trip(tmp_path: Path) -> None:
    rec = Record.model_validate(OK)
    plain = dump_records(tmp_path / "d.jsonl", [rec, rec.model_copy(update={"id": "r2"})])
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes() + b"\n"))
    assert [(n, r.id) for n, r in read_records(gz)] == [(1, "r1"), (2, "r2")]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing-file"):
        read_records(tmp_path / "nope.jsonl")
