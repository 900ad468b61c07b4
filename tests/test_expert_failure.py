"""One expert's failure stops only that expert: its steps pass the failure on instead of
failing, the gate does not pass it, ``publish`` lists it, and the run's last step fails
naming it.

The component bodies run for real (``component.python_func``) on real KFP artifact objects
over temporary files, as the executor would call them; only the pipeline runner is left out
(the whole pipeline runs in ``tests/e2e/test_expert_failure_pipeline.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics, Model

from lorafleet.components import stages as components
from lorafleet.components.runtime import FAILURE_KEY
from lorafleet.errors import DataError
from lorafleet.fleet import load_fleet, spec_to_json
from lorafleet.publish import publish_fleet
from lorafleet.report import render_html, render_markdown, rich_table
from lorafleet.stages import (
    ExpertsFailed,
    failure_report,
    fleet_status,
    reject_stage,
    run_expert_stage,
    stage_failure,
)

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
TRAIN_FAILED = {"expert": "job-analyzer", "stage": "train", "error": "ValueError: no records"}


def _spec(tmp_path: Path, eval_file: Path | None = None) -> str:
    """A two-expert fleet as the pipeline passes it (JSON); job-analyzer's eval file may be
    replaced."""
    ja = DATA / "job-analyzer"
    (tmp_path / "fleet.yaml").write_text(
        f"""\
apiVersion: lorafleet/v1
name: two
experts:
  - name: job-analyzer
    task: job-analyzer
    seed_data: {ja}/seed.jsonl
    eval_data: {eval_file or ja / "eval.jsonl"}
  - name: proposal-writer
    task: proposal-writer
    seed_data: {DATA}/proposal-writer/seed.jsonl
    eval_data: {DATA}/proposal-writer/eval.jsonl
"""
    )
    return spec_to_json(load_fleet(tmp_path / "fleet.yaml", check_files=False))


def _out(kind, tmp_path: Path, name: str):
    """An output artifact as the executor hands it over: a path nothing is written at yet."""
    return kind(name=name, uri=str(tmp_path / "out" / name), metadata={})


# --- the library ----------------------------------------------------------------------------


def test_a_failure_is_the_expert_the_stage_and_one_line() -> None:
    assert stage_failure("e", "train", ValueError("no training\nrecords")) == {
        "expert": "e",
        "stage": "train",
        "error": "ValueError: no training records",
    }
    # a user's mistake reads as it is; a long error is cut
    mistake = stage_failure("e", "validate-data", DataError("f.jsonl", 3, "bad-json", "x" * 900))
    assert mistake["error"].startswith("f.jsonl:3: bad-json: xxx") and len(mistake["error"]) == 500


def test_a_stage_that_raises_returns_its_failure(caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> None:
        raise RuntimeError("disk full")

    assert run_expert_stage("e", "curate", lambda: 7) == (7, None)
    assert run_expert_stage("e", "curate", boom) == (
        None,
        {"expert": "e", "stage": "curate", "error": "RuntimeError: disk full"},
    )
    assert "e: curate failed" in caplog.text and "Traceback" in caplog.text


def test_a_failed_expert_is_rejected_and_the_verdict_names_it() -> None:
    outcome = reject_stage(failure_report(TRAIN_FAILED))
    assert outcome["failure"] == TRAIN_FAILED
    assert (outcome["gate_passed"], outcome["registered"], outcome["adapter_uri"]) == (
        False,
        False,
        None,
    )
    assert outcome["gate_reasons"] == ["FAIL train failed: ValueError: no records"]
    rejected = {"expert": "proposal-writer", "registered": False, "gate_passed": False}
    registered = {"expert": "ok", "registered": True}
    with pytest.raises(ExpertsFailed) as failed:
        fleet_status([registered, outcome, rejected])
    assert (
        str(failed.value) == "1 of 3 experts failed: job-analyzer (train: ValueError: no records)"
    )
    assert fleet_status([registered, rejected]) == {
        "registered": ["ok"],
        "rejected": ["proposal-writer"],
        "failed": {},
    }


# --- the component bodies -------------------------------------------------------------------


def test_a_step_that_fails_marks_its_outputs_instead_of_failing(tmp_path: Path) -> None:
    # Given job-analyzer's eval file is broken (a line that is no JSON)
    broken = tmp_path / "eval.jsonl"
    broken.write_text((DATA / "job-analyzer" / "eval.jsonl").read_text() + "{not json\n")
    outputs = {
        "seeds": _out(Dataset, tmp_path, "seeds"),
        "eval_set": _out(Dataset, tmp_path, "eval_set"),
        "report": _out(Artifact, tmp_path, "report"),
        "report_md": _out(Markdown, tmp_path, "report_md"),
        "report_html": _out(HTML, tmp_path, "report_html"),
    }
    # When its validate step runs, it returns instead of raising
    components.validate_data.python_func(
        spec_json=_spec(tmp_path, broken), expert="job-analyzer", **outputs
    )
    # Then every output carries the failure: the step, and the error on one line
    failure = outputs["seeds"].metadata[FAILURE_KEY]
    assert failure["expert"] == "job-analyzer" and failure["stage"] == "validate-data"
    assert failure["error"].startswith(f"{broken}:") and "\n" not in failure["error"]
    for artifact in outputs.values():
        assert artifact.metadata[FAILURE_KEY] == failure
        assert Path(artifact.path).exists(), f"{artifact.name}: the launcher uploads every output"
    assert "validate-data failed" in Path(outputs["report_md"].path).read_text()


def test_a_failure_is_passed_on_without_running_the_step(tmp_path: Path) -> None:
    # Given the curated set of a failed expert (no records file at all behind it)
    train_set = Dataset(uri=str(tmp_path / "missing"), metadata={FAILURE_KEY: TRAIN_FAILED})
    base = Model(uri=str(tmp_path / "no-base"), metadata={})
    adapter, log = _out(Model, tmp_path, "adapter"), _out(Artifact, tmp_path, "train_log")
    metrics = _out(Metrics, tmp_path, "metrics")
    components.train.python_func(
        spec_json=_spec(tmp_path),
        expert="job-analyzer",
        base=base,
        train_set=train_set,
        adapter=adapter,
        train_log=log,
        metrics=metrics,
    )
    # Then nothing was trained and the same failure goes on, on every output
    assert all(a.metadata[FAILURE_KEY] == TRAIN_FAILED for a in (adapter, log, metrics))
    assert Path(adapter.path).read_text() == "job-analyzer: train failed: ValueError: no records\n"
    # and curation over shards finds it on any one shard
    ok = Dataset(uri=str(tmp_path / "shard-0"), metadata={})
    bad = Dataset(uri=str(tmp_path / "shard-1"), metadata={FAILURE_KEY: TRAIN_FAILED})
    train_out, stats = _out(Dataset, tmp_path, "train_set"), _out(Artifact, tmp_path, "stats")
    components.curate.python_func(
        spec_json=_spec(tmp_path),
        expert="job-analyzer",
        prepared=[ok, bad],
        eval_set=Dataset(uri=str(DATA / "job-analyzer" / "eval.jsonl"), metadata={}),
        train_set=train_out,
        stats=stats,
        stats_md=_out(Markdown, tmp_path, "stats_md"),
    )
    assert train_out.metadata[FAILURE_KEY] == stats.metadata[FAILURE_KEY] == TRAIN_FAILED


def test_the_gate_does_not_pass_a_failed_expert(tmp_path: Path) -> None:
    inputs = {
        name: Artifact(uri=str(tmp_path / name), metadata={FAILURE_KEY: TRAIN_FAILED})
        for name in ("evaluation", "train_log", "curation")
    }
    report, report_md = _out(Artifact, tmp_path, "report"), _out(Markdown, tmp_path, "md")
    decided = components.gate.python_func(
        spec_json=_spec(tmp_path),
        expert="job-analyzer",
        report=report,
        report_md=report_md,
        **inputs,
    )
    assert decided.passed is False
    gated = json.loads(Path(report.path).read_text())
    assert gated["failure"] == TRAIN_FAILED and gated["gate_passed"] is False
    assert "`train` step failed: ValueError: no records" in Path(report_md.path).read_text()
    # and reject records it as the expert's outcome
    outcome = json.loads(components.reject.python_func(report=report))
    assert outcome["failure"] == TRAIN_FAILED and outcome["registered"] is False


def test_the_fleet_status_step_fails_the_run_naming_the_expert() -> None:
    failed = json.dumps(reject_stage(failure_report(TRAIN_FAILED)))
    ok = json.dumps({"expert": "proposal-writer", "registered": True})
    with pytest.raises(ExpertsFailed, match=r"job-analyzer \(train: ValueError: no records\)"):
        components.fleet_status.python_func(outcomes=[ok, failed])
    assert json.loads(components.fleet_status.python_func(outcomes=[ok]))["registered"] == [
        "proposal-writer"
    ]


# --- publish and the report -----------------------------------------------------------------


def test_publish_lists_the_failed_expert_with_its_error(tmp_path: Path) -> None:
    _spec(tmp_path)  # writes fleet.yaml
    spec = load_fleet(tmp_path / "fleet.yaml", check_files=False)
    failed = reject_stage(failure_report(TRAIN_FAILED))
    rejected = reject_stage(
        {
            "expert": "proposal-writer",
            "task": "proposal-writer",
            "gate_passed": False,
            "gate_reasons": ["FAIL min-skill_coverage"],
            "gate_rules": [{"rule": "min-skill_coverage", "passed": False, "message": "low"}],
            "eval_loss_base": 2.0,
            "eval_loss_candidate": 1.5,
            "metrics_base": {},
            "metrics_candidate": {},
            "train": {"losses": [2.0, 1.5], "steps": 2, "tokens_per_s": 10.0},
            "curation": {"output": {"total": 4, "human": 2, "synthetic": 2}},
        }
    )
    files = [tmp_path / n for n in ("summary.json", "report.html", "summary.md")]
    # Nothing registered: no server starts
    summary = publish_fleet(spec, "no-base-needed", [rejected, failed], *files)
    assert list(summary["experts"]) == ["job-analyzer", "proposal-writer"]
    assert summary["failed"] == {"job-analyzer": TRAIN_FAILED}
    assert summary["experts"]["job-analyzer"]["served"] is False
    assert json.loads(files[0].read_text()) == summary
    markdown = files[2].read_text()
    assert "| job-analyzer | - | - | - | FAILED (train) | - | no |" in markdown
    assert "- **job-analyzer**: failed in train: ValueError: no records" in markdown
    html = files[1].read_text()
    assert html == render_html(summary) and "failed in train" in html
    assert render_markdown(summary) == markdown
    assert rich_table(summary).row_count == 2


def test_a_registration_that_fails_is_the_experts_failure(tmp_path: Path) -> None:
    # Given a gate report register must refuse (it did not pass)
    report = Artifact(uri=str(tmp_path / "report.json"), metadata={})
    gated = {"expert": "job-analyzer", "gate_passed": False, "gate_rules": []}
    Path(report.path).write_text(json.dumps(gated))
    outcome = json.loads(
        components.register.python_func(
            spec_json=_spec(tmp_path),
            expert="job-analyzer",
            base=Model(uri=str(tmp_path / "base"), metadata={}),
            adapter=Model(uri=str(tmp_path / "adapter"), metadata={}),
            report=report,
        )
    )
    # Then the step returns the expert's failed outcome instead of failing
    assert outcome["failure"] == {
        "expert": "job-analyzer",
        "stage": "register",
        "error": "ValueError: job-analyzer: refusing to register a candidate that failed its gate",
    }
    assert outcome["registered"] is False and outcome["adapter_version"] is None
