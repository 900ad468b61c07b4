"""``lorafleet eval run|compare`` through the real CLI on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "2",
    }
    return subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.integration
def test_eval_run_writes_reports_and_compare_sets_them_side_by_side(
    tiny_base, tiny_adapters, tmp_path: Path
) -> None:
    lines = (DATA / "job-analyzer" / "eval.jsonl").read_text().splitlines()[:2]
    (tmp_path / "eval.jsonl").write_text("\n".join(lines) + "\n")
    common = [
        "--base",
        str(tiny_base),
        "--eval",
        "eval.jsonl",
        "--task",
        "job-analyzer",
        "--max-new-tokens",
        "4",
    ]

    # Given a candidate and a production adapter, when the candidate is evaluated against both baselines...
    run = _cli(
        "eval",
        "run",
        *common,
        "--adapter",
        str(tiny_adapters["job-analyzer"]),
        "--production",
        str(tiny_adapters["proposal-writer"]),
        "-o",
        "a.json",
        "--markdown",
        "a.md",
        "--html",
        "a.html",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "a.json").read_text())
    # ...then every arm has its loss and metrics, and the gate explains itself per rule.
    for arm in ("candidate", "base", "production"):
        assert report[f"eval_loss_{arm}"] > 0
        assert {"json_valid", "field_f1", "safety_pass_rate"} <= set(report[f"metrics_{arm}"])
    rules = [r["rule"] for r in report["gate_rules"]]
    assert rules[0] == "heldout-loss-vs-base" and "heldout-loss-vs-production" in rules
    assert len(report["gate_reasons"]) == len(rules)
    assert "| metric | candidate | base | production |" in (tmp_path / "a.md").read_text()
    page = (tmp_path / "a.html").read_text()
    assert page.count("<svg") == 1 and "<script" not in page
    # the result table on stdout, diagnostics only on stderr
    assert "held-out loss" in run.stdout and "held-out loss" not in run.stderr
    assert "0:00:" not in run.stderr  # no progress bar (its elapsed-time column) off a terminal

    # The base as its own candidate: compare the two reports.
    again = _cli(
        "eval",
        "run",
        *common,
        "--adapter",
        str(tiny_adapters["proposal-writer"]),
        "-o",
        "b.json",
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    compare = _cli("eval", "compare", "a.json", "b.json", cwd=tmp_path)
    assert compare.returncode == 0, compare.stderr[-2000:]
    b = json.loads((tmp_path / "b.json").read_text())
    change = b["eval_loss_candidate"] - report["eval_loss_candidate"]
    assert f"{change:+.4f}" in compare.stdout
    as_json = _cli("eval", "compare", "a.json", "b.json", "--json", cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr[-2000:]
    both = json.loads(as_json.stdout)
    assert both["a.json"]["eval_loss_candidate"] == report["eval_loss_candidate"]
    assert both["b.json"]["metrics_candidate"] == b["metrics_candidate"]


def test_eval_cli_user_mistakes_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("")
    (tmp_path / "bad.json").write_text("{}")
    bad_task = _cli(
        "eval",
        "run",
        "--base",
        ".",
        "--adapter",
        ".",
        "--eval",
        "e.jsonl",
        "--task",
        "poetry",
        cwd=tmp_path,
    )
    assert bad_task.returncode == 2
    assert bad_task.stderr.strip() == "error: --task: unknown task 'poetry'; shipped: " + (
        "candidate-evaluator, chat, job-analyzer, job-post-writer, profile-reviewer, proposal-writer"
    )
    not_a_report = _cli("eval", "compare", "bad.json", "bad.json", cwd=tmp_path)
    assert not_a_report.returncode == 2
    assert (
        "bad.json: not an evaluation report (no eval_loss_candidate, metrics_candidate)"
        in not_a_report.stderr
    )
