"""The shared rich console of the CLI (stderr, so stdout stays clean for ``-o json``)."""

from __future__ import annotations

import sys

from rich.console import Console

# Wide enough for the summary table when the output is a log, not a terminal.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
