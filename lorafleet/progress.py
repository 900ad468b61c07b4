"""Live progress of a local run: one row per expert with its stage, time and last figure.

A pipeline step reports progress by printing a marked line on its stdout
(:func:`emit`); ``kfp.local`` streams every step's output into the runner, which keeps the
raw lines in the run's log and feeds the marked ones to a :class:`Board`. On a terminal the
board is a live table; in a pipe or a CI log it prints one plain line each time an expert
moves to another stage or finishes one, so logs stay short and readable.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

__all__ = ["ENV", "FLEET", "MARK", "Board", "emit", "parse"]

MARK = "::lorafleet-progress::"
FLEET = "(fleet)"  # the row of the steps that serve every expert: base, publish, deploy


ENV = "LORAFLEET_PROGRESS"  # set by the local runner; steps elsewhere print no events


def emit(expert: str, stage: str, figure: str | None = None, *, done: bool = False) -> None:
    """Report that ``expert`` is in ``stage`` (with its latest figure, if any), when a local
    run listens (``LORAFLEET_PROGRESS=1``); otherwise nothing is printed."""
    if os.environ.get(ENV) != "1":
        return
    event = {"expert": expert, "stage": stage, "figure": figure, "done": done}
    print(f"{MARK} {json.dumps(event)}", flush=True)


def parse(line: str) -> dict | None:
    """The event on a marked line (wherever the mark is on it), else ``None``."""
    at = line.find(MARK)
    if at < 0:
        return None
    try:
        event = json.loads(line[at + len(MARK) :])
    except json.JSONDecodeError:
        return None
    ok = isinstance(event, dict) and isinstance(event.get("expert"), str)
    return event if ok and isinstance(event.get("stage"), str) else None


@dataclass
class _Row:
    stage: str = "waiting"
    since: float = 0.0
    figure: str = ""
    history: list[str] = field(default_factory=list)


class Board:
    """What every expert is doing; shown live on a terminal, as plain lines elsewhere.

    Args:
        experts: the run's experts, in the order they are shown.
        out: where it is shown (stderr).
        live: a live table (default: when ``out`` is a terminal).
        clock: seconds, for elapsed times.
    """

    def __init__(
        self,
        experts: list[str],
        out: TextIO | None = None,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = out or sys.stderr
        self.clock, self.start = clock, clock()
        self.rows = {name: _Row(since=self.start) for name in [FLEET, *experts]}
        self._live = None
        if live if live is not None else self.out.isatty():
            from rich.console import Console
            from rich.live import Live

            self._live = Live(
                get_renderable=self.table,
                console=Console(file=self.out),
                refresh_per_second=4,
                transient=False,
            )

    def __enter__(self) -> Board:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.stop()

    def update(
        self, expert: str, stage: str, figure: str | None = None, done: bool = False
    ) -> None:
        """Record an event; in plain mode print a line when the stage changes or ends."""
        row = self.rows.setdefault(expert, _Row(since=self.clock()))
        moved = stage != row.stage
        if moved:
            row.stage, row.since, row.figure = stage, self.clock(), ""
            row.history.append(stage)
        if figure:
            row.figure = figure
        if self._live is None and (moved or done):
            self.out.write(self.line(expert) + "\n")
            self.out.flush()

    def event(self, event: dict) -> None:
        """Record a parsed :func:`emit` event."""
        self.update(event["expert"], event["stage"], event.get("figure"), bool(event.get("done")))

    def line(self, expert: str) -> str:
        """One row as plain text: ``expert  stage  m:ss  figure``."""
        row = self.rows[expert]
        return f"{expert:<24} {row.stage:<11} {self._elapsed(row):>6}  {row.figure}".rstrip()

    def _elapsed(self, row: _Row) -> str:
        s = int(self.clock() - row.since)
        return f"{s // 60}:{s % 60:02d}"

    def table(self):
        """The live view: a ``rich`` table, one row per expert (and one for fleet steps)."""
        from rich.table import Table

        s = int(self.clock() - self.start)
        table = Table(title=f"lorafleet run · {s // 60}:{s % 60:02d}", title_justify="left")
        for column in ("expert", "stage", "time", "last"):
            table.add_column(column, no_wrap=column != "last")
        for name, row in self.rows.items():
            if name == FLEET and row.stage == "waiting":
                continue
            table.add_row(name, row.stage, self._elapsed(row), row.figure)
        return table
