"""Errors a user can cause and fix: one line each, exit code 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

__all__ = [
    "DataError",
    "LorafleetError",
    "SpecError",
    "StorageError",
    "first_problem",
    "validation_problems",
]


class LorafleetError(Exception):
    """Base class for user-facing errors; the CLI prints ``str(error)`` and exits 2."""

    exit_code = 2


def _shown(text: str) -> str:
    """``text`` on one line: unprintable characters (a newline, a control character: a YAML
    key may hold anything) as their escapes, and ``''`` for nothing at all."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) or "''"


class SpecError(LorafleetError):
    """A fleet spec breaks a rule: ``FILE:LINE: field.path: message``.

    When validation finds several problems at once, ``more`` holds the others as
    ``(line, field, message)``; each becomes a line of its own, so the user fixes them
    all in one go instead of one per run. A field or message that holds a newline or
    another unprintable character (a YAML key, a parser's message) is shown on its one line.
    """

    def __init__(
        self,
        file: str | Path,
        line: int | None,
        field: str,
        message: str,
        more: list[tuple[int | None, str, str]] | None = None,
    ) -> None:
        self.file, self.line, self.field, self.message = str(file), line, field, message
        self.more = list(more or [])
        lines = [
            f"{self.file}:{at}: {where}: {why}" if at else f"{self.file}: {where}: {why}"
            for at, where, why in (
                (at, _shown(where), _shown(" ".join(why.split())))
                for at, where, why in [(line, field, message), *self.more]
            )
        ]
        super().__init__("\n".join(lines))


class DataError(LorafleetError):
    """A data file breaks a rule: ``FILE:LINE: rule: detail``."""

    def __init__(self, file: str | Path, line: int | None, rule: str, detail: str) -> None:
        self.file, self.line, self.rule, self.detail = str(file), line, rule, detail
        where = f"{self.file}:{line}" if line else self.file
        super().__init__(f"{where}: {rule}: {detail}")


class StorageError(LorafleetError):
    """A storage location or operation failed: ``URI: reason``, always on one line.

    A URI with unprintable characters is shown escaped, and whitespace runs in the reason
    (a server's multi-line message) collapse to one space, so the message stays one line.
    """

    def __init__(self, uri: str, reason: str) -> None:
        self.uri, self.reason = uri, " ".join(reason.split())
        shown = uri if uri.isprintable() else ascii(uri)
        super().__init__(f"{shown}: {self.reason}")


def validation_problems(exc: ValidationError) -> list[tuple[tuple[str | int, ...], str]]:
    """Every problem pydantic found, as ``(location, message)`` in the words a user reads:
    a validator's ``Value error, `` prefix dropped, a forbidden extra field called an
    unknown field."""
    problems = []
    for err in exc.errors():
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        problems.append((tuple(err["loc"]), message))
    return problems


def first_problem(exc: ValidationError, root: str) -> str:
    """``field.path: message`` of the first problem; ``root`` names a problem of the whole
    object (a cross-field rule, whose location is empty) and prefixes nested paths when it
    ends with a dot (``"canary."`` gives ``canary.steps: ...``); with an empty ``root`` a
    problem of the whole object is its message alone."""
    loc, message = validation_problems(exc)[0]
    path = ".".join(map(str, loc))
    if root.endswith("."):
        return f"{root}{path}: {message}" if path else f"{root[:-1]}: {message}"
    return f"{path or root}: {message}" if path or root else message
