"""The CLI's two rich consoles: ``out`` (stdout) for results a user may pipe or parse —
tables, JSON — and ``console`` (stderr) for progress, status lines and diagnostics.

On a terminal both fit its width. Piped or logged, nothing is hard-wrapped: text keeps its
lines (``soft_wrap``) and tables get room for their longest cell instead of cutting paths.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console

from lorafleet.io import atomic_write_json

__all__ = ["console", "out", "write_json_result"]

# Wide enough that a piped table never folds a path or a version; rich only takes the width
# a table needs, so nothing is padded out to it.
_PIPED_WIDTH = 1000


def _console(stream: TextIO, stderr: bool) -> Console:
    piped = not stream.isatty()
    return Console(
        stderr=stderr, width=_PIPED_WIDTH if piped else None, soft_wrap=piped, highlight=False
    )


console = _console(sys.stderr, stderr=True)
out = _console(sys.stdout, stderr=False)


def write_json_result(target: str | Path, obj: Any) -> None:
    """Write a command's JSON result to ``target``: stdout for ``-``, else a file (atomically)."""
    if str(target) == "-":
        sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    else:
        atomic_write_json(target, obj)
