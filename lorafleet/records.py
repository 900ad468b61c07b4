"""The data format: one JSON record a line (see docs/data-format.md).

A record is ``{"id", "task", "messages", "source", "meta"}`` where ``messages`` are
OpenAI-style ``{"role", "content"}`` turns. The reader streams a ``.jsonl`` or
``.jsonl.gz`` file with line numbers and turns the first malformed line into a
:class:`~lorafleet.errors.DataError` naming file, line and rule. Rules that span records
(unique ids, role order, length bounds, answer shapes) are the great-expectations
suite's (:mod:`lorafleet.data.validate`).
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lorafleet.errors import DataError
from lorafleet.fleet import check_task
from lorafleet.io import atomic_write_text

__all__ = [
    "MAX_LINE_BYTES",
    "Message",
    "Record",
    "dump_records",
    "iter_records",
    "parse_record",
    "read_records",
    "record_text",
]

Role = Literal["system", "user", "assistant"]
# One record a line; a line longer than this is a broken export, not a conversation.
MAX_LINE_BYTES = 1 << 20
BOM = b"\xef\xbb\xbf"
NUL = b"\x00"


class Message(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Role
    content: str


class Record(BaseModel):
    """One training or evaluation example."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1)
    task: str
    messages: list[Message] = Field(min_length=1)
    source: Literal["human", "synthetic"]
    meta: dict[str, Any] = Field(default_factory=dict)

    _task = field_validator("task")(check_task)

    def to_json(self) -> str:
        """The record as one compact JSON line (no newline)."""
        return json.dumps(self.model_dump(mode="json"), ensure_ascii=False, separators=(",", ":"))


def _rule(err: dict) -> tuple[str, str]:
    """The reader's rule and detail for the first pydantic error of a record."""
    loc = ".".join(str(p) for p in err["loc"]) or "record"
    kind, last = err["type"], err["loc"][-1] if err["loc"] else None
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "missing":
        rule = "missing-field"
    elif kind == "extra_forbidden":
        rule = "unknown-field"
    elif kind == "literal_error":
        rule = {"role": "unknown-role", "source": "unknown-source"}.get(str(last), "wrong-value")
    elif kind == "value_error" and last == "task":
        rule = "bad-task-name"
    elif kind in ("too_short", "string_too_short"):
        rule = "empty-field"
    else:  # string_type, list_type, dict_type, model_type, ...
        rule = "wrong-type"
    return rule, f"{loc}: {msg}"


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    for k in keys:
        if keys.count(k) > 1:
            raise DataError("", None, "duplicate-key", f"key {k!r} appears twice in one object")
    return dict(pairs)


def _no_constants(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not valid JSON", name, 0)


def parse_record(text: str) -> Record:
    """Parse one JSON line into a record.

    Args:
        text: the line, decoded.

    Returns:
        The record.

    Raises:
        DataError: without file or line (the caller adds them), naming the rule broken.
    """
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise DataError("", None, "json", exc.msg) from None
    if not isinstance(obj, dict):
        raise DataError(
            "", None, "not-an-object", f"expected a JSON object, got {type(obj).__name__}"
        )
    try:
        return Record.model_validate(obj)
    except ValidationError as exc:
        raise DataError("", None, *_rule(exc.errors()[0])) from None


def _lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, bytes]]:
    """``(line_number, raw_line)``; a line is read at most ``max_line_bytes + 1`` at a time."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        lineno = 0
        while raw := fh.readline(max_line_bytes + 1):
            lineno += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise DataError(
                    path, lineno, "line-too-long", f"line is over {max_line_bytes} bytes"
                )
            yield lineno, raw


def iter_records(
    path: str | Path, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[tuple[int, Record]]:
    """Stream ``(line_number, record)`` from a ``.jsonl`` or ``.jsonl.gz`` file.

    Blank lines are skipped; ``\\r\\n`` line endings are accepted.

    Args:
        path: the file.
        max_line_bytes: the longest line accepted.

    Yields:
        The 1-based line number and the record on it.

    Raises:
        DataError: on the first malformed line, naming file, line and rule.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "missing-file", "no such file")
    first = True
    try:
        for lineno, raw in _lines(path, max_line_bytes):
            if lineno == 1 and raw.startswith(BOM):
                raise DataError(
                    path,
                    1,
                    "utf8-bom",
                    "the file starts with a byte order mark; save it as UTF-8 without BOM",
                )
            if NUL in raw:
                raise DataError(path, lineno, "nul-byte", f"NUL byte at byte {raw.index(NUL) + 1}")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    path, lineno, "utf8", f"invalid UTF-8 at byte {exc.start}"
                ) from None
            if not text.strip():
                continue
            if first and text.lstrip().startswith("["):
                raise DataError(
                    path,
                    lineno,
                    "json-array",
                    "the file is a JSON array; write one JSON object a line (JSONL)",
                )
            first = False
            try:
                record = parse_record(text)
            except DataError as exc:
                raise DataError(path, lineno, exc.rule, exc.detail) from None
            yield lineno, record
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(path, None, "gzip", f"not a readable gzip file: {exc}") from None


def read_records(
    path: str | Path, max_line_bytes: int = MAX_LINE_BYTES
) -> list[tuple[int, Record]]:
    """Read a whole file; see :func:`iter_records`."""
    return list(iter_records(path, max_line_bytes))


def dump_records(path: str | Path, records: Iterable[Record]) -> Path:
    """Write records as JSONL, atomically."""
    return atomic_write_text(path, "".join(r.to_json() + "\n" for r in records))


def record_text(record: Record, roles: tuple[str, ...] = ("user", "assistant")) -> str:
    """The concatenated content of a record's turns with the given roles."""
    return "\n".join(m.content for m in record.messages if m.role in roles)
