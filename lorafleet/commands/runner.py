"""Run a typer app the lorafleet way: user mistakes are one line on stderr, never a traceback.

Every entry point uses :func:`run_app`: ``lorafleet``, ``kubectl lorafleet``,
``python -m lorafleet.serve.runtime`` and ``python -m lorafleet.serve.router``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click
import typer

from lorafleet.errors import LorafleetError

__all__ = ["run_app"]


def run_app(app: typer.Typer, **options: Any) -> None:
    """Run ``app`` and exit: a :class:`LorafleetError` becomes one ``error:`` line and its
    exit code (2); click's usage errors and aborts keep their own codes.

    Args:
        app: the typer app to run.
        **options: passed to click (``args``, ``prog_name``, ``obj``).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    level = os.environ.get("LORAFLEET_LOG", "WARNING")
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # Libraries (great-expectations) set their own loggers to INFO: filter at the handler.
    for handler in logging.root.handlers:
        handler.setLevel(level)
    try:
        # Outside standalone mode click returns the code of a typer.Exit instead of exiting.
        code = app(standalone_mode=False, **options)
        sys.exit(code if isinstance(code, int) else 0)
    except LorafleetError as exc:
        # one line a problem (a spec check may find several at once)
        for line in str(exc).splitlines() or [""]:
            typer.echo(f"error: {line}", err=True)
        sys.exit(exc.exit_code)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code)
    except Exception as exc:  # click usage errors and aborts carry their own exit codes
        # Recent typer versions raise their own copy of click's exceptions (typer.TyperException).
        if isinstance(exc, click.ClickException | typer.TyperException) and hasattr(exc, "show"):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort | typer.Abort):
            sys.exit(130)
        raise
