"""Errors a user can cause and fix: one line each, exit code 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DataError", "LorafleetError", "SpecError"]


class LorafleetError(Exception):
    """Base class for user-facing errors; the CLI prints ``str(error)`` and exits 2."""

    exit_code = 2


class SpecError(LorafleetError):
    """A fleet spec breaks a rule: ``FILE:LINE: field.path: message``."""

    def __init__(self, file: str | Path, line: int | None, field: str, message: str) -> None:
        self.file, self.line, self.field, self.message = str(file), line, field, message
        where = f"{self.file}:{line}" if line else self.file
        super().__init__(f"{where}: {field}: {message}")


class DataError(LorafleetError):
    """A data file breaks a rule: ``FILE:LINE: rule: detail``."""

    def __init__(self, file: str | Path, line: int | None, rule: str, detail: str) -> None:
        self.file, self.line, self.rule, self.detail = str(file), line, rule, detail
        where = f"{self.file}:{line}" if line else self.file
        super().__init__(f"{where}: {rule}: {detail}")
