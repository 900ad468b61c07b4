"""The data format: one JSON record a line (see docs/data-format.md).

A record is ``{"id", "task", "messages", "source", "meta"}`` where ``messages`` are
OpenAI-style ``{"role", "content"}`` turns. The reader streams a file with line numbers
and turns every malformed line into a :class:`~lorafleet.errors.DataError`.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorafleet.errors import DataError
from lorafleet.io import atomic_write_text

__all__ = ["Message", "Record", "dump_records", "iter_records", "read_records", "record_text"]

Role = Literal["system", "user", "assistant"]


class Message(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Role
    content: str


class Record(BaseModel):
    """One training or evaluation example."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1)
    task: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    source: Literal["human", "synthetic"]
    meta: dict[str, Any] = Field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), ensure_ascii=False, separators=(",", ":"))


def _first_error(err: ValidationError) -> tuple[str, str]:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "record"
    kind = e["type"]
    rule = {"missing": "missing-field", "extra_forbidden": "unknown-field"}.get(kind, "schema")
    return rule, f"{loc}: {e['msg']}"


def _open_lines(path: Path) -> Iterator[bytes]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        yield from fh


def iter_records(path: str | Path) -> Iterator[tuple[int, Record]]:
    """Stream ``(line_number, record)`` from a ``.jsonl`` or ``.jsonl.gz`` file.

    Raises:
        DataError: on the first malformed line, naming file, line and rule.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "missing-file", "no such file")
    for lineno, raw in enumerate(_open_lines(path), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(path, lineno, "utf8", f"invalid UTF-8 at byte {exc.start}") from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(path, lineno, "json", exc.msg) from None
        if not isinstance(obj, dict):
            raise DataError(path, lineno, "not-an-object", f"expected a JSON object, got {type(obj).__name__}")
        try:
            yield lineno, Record.model_validate(obj)
        except ValidationError as exc:
            rule, detail = _first_error(exc)
            raise DataError(path, lineno, rule, detail) from None


def read_records(path: str | Path) -> list[tuple[int, Record]]:
    """Read a whole file; see :func:`iter_records`."""
    return list(iter_records(path))


def dump_records(path: str | Path, records: Iterable[Record]) -> Path:
    """Write records as JSONL, atomically."""
    return atomic_write_text(path, "".join(r.to_json() + "\n" for r in records))


def record_text(record: Record, roles: tuple[str, ...] = ("user", "assistant")) -> str:
    """The concatenated content of a record's turns with the given roles."""
    return "\n".join(m.content for m in record.messages if m.role in roles)
