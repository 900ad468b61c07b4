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
from typer.core import TyperOption

from lorafleet.errors import LorafleetError

__all__ = ["run_app"]


def _untyped_flags() -> None:
    """Show flags in rich help without a type. typer 0.29's rich help writes ``<bool>``
    after every flag, ``--help`` included, though a flag takes no value (its plain help,
    ``TyperOption.get_help_record``, leaves it out); typer offers no setting for it, and
    ``--help`` is made inside typer, so no option's ``metavar`` can fix it. typer up to
    0.28 has no ``display_type_rich`` and already hides a flag's ``BOOLEAN``. Idempotent."""
    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "untyped_flags", False):
        return

    def display_type_rich(self: TyperOption, ctx: click.Context) -> str | None:
        return None if self.is_flag and self.metavar is None else shown(self, ctx)

    display_type_rich.untyped_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


def run_app(app: typer.Typer, **options: Any) -> None:
    """Run ``app`` and exit: a :class:`LorafleetError` becomes one ``error:`` line and its
    exit code (2); click's usage errors and aborts keep their own codes.

    Args:
        app: the typer app to run.
        **options: passed to click (``args``, ``prog_name``, ``obj``).
    """
    _untyped_flags()
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
