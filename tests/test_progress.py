"""Live progress of `lorafleet run`: steps' events become one row per expert; raw task
lines stay in the run's log."""

from __future__ import annotations

import io

from lorafleet import progress
from lorafleet.local import _ProgressLog


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_steps_print_events_only_when_a_local_run_listens(monkeypatch, capsys) -> None:
    monkeypatch.delenv(progress.ENV, raising=False)
    progress.emit("job-analyzer", "train", "step 1/9 loss 3.1")
    assert capsys.readouterr().out == ""
    monkeypatch.setenv(progress.ENV, "1")
    progress.emit("job-analyzer", "train", "step 1/9 loss 3.1")
    line = capsys.readouterr().out
    assert progress.parse("    " + line) == {
        "expert": "job-analyzer",
        "stage": "train",
        "figure": "step 1/9 loss 3.1",
        "done": False,
    }
    assert progress.parse("an ordinary log line") is None
    assert progress.parse(progress.MARK + " {broken") is None


def test_the_plain_board_prints_a_line_per_stage_change_and_end_not_per_step() -> None:
    out, clock = io.StringIO(), _Clock()
    board = progress.Board(["job-analyzer", "proposal-writer"], out, live=False, clock=clock)
    board.update("job-analyzer", "train", "step 1/40 loss 3.200")
    clock.now += 75
    board.update("job-analyzer", "train", "step 20/40 loss 2.100")  # same stage: no line
    board.update("job-analyzer", "train", "loss 3.200 -> 1.900", done=True)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].split() == ["job-analyzer", "train", "0:00", "step", "1/40", "loss", "3.200"]
    assert lines[1].split()[:3] == ["job-analyzer", "train", "1:15"]
    assert lines[1].endswith("loss 3.200 -> 1.900")
    table = board.table()
    assert [c.header for c in table.columns] == ["expert", "stage", "time", "last"]
    assert table.row_count == 2  # the fleet row appears once a fleet step starts


def test_the_run_log_keeps_every_line_and_the_terminal_gets_the_board(tmp_path) -> None:
    terminal, log = io.StringIO(), io.StringIO()
    board = progress.Board(["job-analyzer"], terminal, live=False)
    sink = _ProgressLog(log, board, terminal)
    event = '{"expert": "job-analyzer", "stage": "validate", "figure": null, "done": false}'
    sink.write("07:16:23.964 - INFO - Executing task 'build-base'\n")
    sink.write("07:16:53.059 - INFO - Executing task 'validate-data'\n    {\"executor\": 1}\n")
    sink.write(f"    {progress.MARK} {event}\n")
    sink.write("07:17:03.821 - ERROR - Task 'train' finished with status FAILURE\n")
    shown = terminal.getvalue().splitlines()
    assert [ln.split()[:2] for ln in shown[:2]] == [
        ["(fleet)", "build-base"],
        ["job-analyzer", "validate"],
    ]
    assert shown[2] == "Task 'train' finished with status FAILURE"
    assert "Executing task 'validate-data'" not in terminal.getvalue()
    assert "Executing task 'validate-data'" in log.getvalue() and progress.MARK in log.getvalue()
