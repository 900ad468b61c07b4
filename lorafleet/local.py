"""Run the compiled fleet pipeline locally with ``kfp.local`` (no cluster).

When an expert's step fails, the others still go on to ``publish``; the run then ends with
:class:`ExpertsFailed`, after the run folder holds the summary and report of every expert
(the failed ones named with their step and error).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

from lorafleet.errors import DataError, SpecError
from lorafleet.fleet import FleetSpec, is_local_data, load_fleet, spec_to_json
from lorafleet.io import atomic_write_json, atomic_write_text
from lorafleet.progress import ENV as PROGRESS_ENV
from lorafleet.progress import FLEET, Board
from lorafleet.progress import parse as parse_progress
from lorafleet.report import render_html
from lorafleet.storage import parse_location

__all__ = ["ExpertsFailed", "PipelineFailed", "new_run_id", "preflight", "run_local"]

log = logging.getLogger(__name__)

LOCAL_PARALLEL_TASKS = 2  # what kfp.local's ParallelFor executor runs at once
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FLEET_TASK = re.compile(r"Executing task '(resolve-fleet|build-base|publish|deploy)'")
_FAILED = re.compile(r"finished with status FAILURE|failed with exception")


class PipelineFailed(RuntimeError):
    """A pipeline task failed; the message names it and points at the full log."""


class ExpertsFailed(PipelineFailed):
    """Experts failed, and the others were published: the run folder has everyone's results.

    Attributes:
        run_dir: the run folder (summary.json, report.html).
        summary: the summary, the failed experts in ``failed``.
    """

    def __init__(self, message: str, run_dir: Path, summary: dict) -> None:
        super().__init__(message)
        self.run_dir, self.summary = run_dir, summary


def _published_summary(root: Path) -> Path | None:
    """The summary ``publish`` wrote under a kfp.local pipeline root, if it ran."""
    found = sorted(root.glob("*/publish/summary"))
    return found[-1] if found else None


class _ProgressLog:
    """A stdout stand-in: everything goes to the run's log; the steps' progress events go to
    the board (:mod:`lorafleet.progress`), and a failing task's line to the terminal.

    kfp.local prints every task's executor input and streamed output; the log keeps them.
    """

    def __init__(self, log_file, board: Board, terminal) -> None:
        self.log_file, self.board, self.terminal = log_file, board, terminal
        self._partial = ""

    def write(self, text: str) -> int:
        self.log_file.write(_ANSI.sub("", text))
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            line = _ANSI.sub("", line)
            if (event := parse_progress(line)) is not None:
                self.board.event(event)
            elif m := _FLEET_TASK.search(line):
                self.board.update(FLEET, m.group(1))
            elif _FAILED.search(line):
                shown = line.split(" - INFO - ")[-1].split(" - ERROR - ")[-1]
                self.terminal.write(shown + "\n")
                self.terminal.flush()
        return len(text)

    def flush(self) -> None:
        self.log_file.flush()


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def preflight(spec: FleetSpec) -> None:
    """Validate every local data file before any task starts, so a mistake is one clear line.

    Files in a store (``s3://``, ``gs://``, ``pvc://``) are read, and checked, by the
    pipeline's validate step.

    Raises:
        DataError: naming the first bad file, line and rule.
    """
    from lorafleet.data.validate import validate_file

    for e in spec.experts:
        for location in (e.seed_data, e.eval_data):
            if is_local_data(location):
                validate_file(
                    parse_location(location).uri, e.task_definition, e.data
                ).raise_for_failures()


def run_local(
    spec_path: str | Path,
    runs_dir: str | Path = "runs",
    run_id: str | None = None,
    experts: list[str] | None = None,
) -> tuple[Path, dict]:
    """Check the spec and data, run the fleet pipeline through ``kfp.local``, collect the outputs.

    Args:
        spec_path: the fleet spec.
        runs_dir: where the run folder goes.
        run_id: the run folder's name (default: a UTC timestamp).
        experts: run only these experts (default: all); the base is still the whole fleet's.

    Returns:
        The run directory (holding summary.json and report.html) and the summary.

    Raises:
        ExpertsFailed: when experts failed (the others were published): the run directory
            holds everyone's summary and report all the same.
        PipelineFailed: when a step of the whole fleet failed (nothing was published).
    """
    from kfp import local

    from lorafleet.pipelines.fleet_pipeline import fleet_pipeline

    start = time.perf_counter()
    spec = load_fleet(spec_path)
    names = [e.name for e in spec.experts]
    unknown = sorted(set(experts or []) - set(names))
    if unknown:
        raise SpecError(
            spec_path,
            None,
            "experts",
            f"no expert named {', '.join(unknown)}; the spec has {', '.join(names)}",
        )
    selected = [n for n in names if n in experts] if experts else names
    preflight(spec)
    run_dir = Path(runs_dir) / (run_id or new_run_id())
    if run_dir.exists():
        raise DataError(
            run_dir, None, "run-exists", "a run with this id exists; choose another --run-id"
        )
    root = run_dir / "pipeline"
    root.mkdir(parents=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root.resolve()))
    # kfp.local runs two ParallelFor iterations at once: give each its share of the CPU.
    if len(selected) > 1:
        os.environ.setdefault(
            "LORAFLEET_THREADS_PER_TASK", str(max(1, (os.cpu_count() or 2) // LOCAL_PARALLEL_TASKS))
        )
    os.environ[PROGRESS_ENV] = "1"  # the steps report progress to the board
    log_path = run_dir / "pipeline.log"
    with (
        open(log_path, "w", encoding="utf-8") as fh,
        Board(selected, sys.stderr) as board,
        contextlib.redirect_stdout(_ProgressLog(fh, board, sys.stderr)),
    ):
        try:
            task = fleet_pipeline(spec_json=spec_to_json(spec), experts=selected)
            published = Path(task.outputs["summary"].path)
        except RuntimeError as exc:
            # fleet-status fails the run when experts failed, after publish wrote the summary
            published = _published_summary(root)
            failed = json.loads(published.read_text()).get("failed") if published else None
            if not failed:
                raise PipelineFailed(f"{_ANSI.sub('', str(exc))} Full log: {log_path}") from None
        board.update(FLEET, "finished", f"{time.perf_counter() - start:.0f} s", done=True)
    summary = json.loads(published.read_text())
    summary["run_id"] = run_dir.name
    summary["wall_time_s"] = round(time.perf_counter() - start, 1)
    atomic_write_json(run_dir / "summary.json", summary)
    atomic_write_text(run_dir / "report.html", render_html(summary))
    shutil.copy2(spec_path, run_dir / "fleet.yaml")
    failed = summary.get("failed") or {}
    if failed:
        why = "; ".join(f"{name} ({f['stage']}: {f['error']})" for name, f in failed.items())
        raise ExpertsFailed(
            f"{len(failed)} of {len(summary['experts'])} experts failed: {why}. The others' "
            f"results: {run_dir}/summary.json, {run_dir}/report.html; full log: {log_path}",
            run_dir,
            summary,
        )
    return run_dir, summary
