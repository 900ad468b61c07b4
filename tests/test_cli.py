"""User mistakes on the CLI: one line naming file/line and rule, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .cli_support import run_lorafleet as _cli

REC = {
    "id": "a1",
    "task": "job-analyzer",
    "messages": [
        {"role": "user", "content": "Need a React dev"},
        # The job-analyzer suite checks answers against its JSON schema (docs/data-format.md).
        {
            "role": "assistant",
            "content": json.dumps(
                {
                    "skills": ["React"],
                    "deliverables": [],
                    "timeline": None,
                    "open_questions": [],
                    "budget": {"type": "hourly", "min": None, "max": None, "currency": "USD"},
                }
            ),
        },
    ],
    "source": "human",
    "meta": {},
}


def test_run_with_bad_data_stops_before_any_task(tmp_path: Path) -> None:
    lines = [
        json.dumps(REC),
        json.dumps({**REC, "id": "a2"}),
        json.dumps(REC),
    ]  # line 3 repeats id a1
    (tmp_path / "seed.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "eval.jsonl").write_text(json.dumps({**REC, "id": "e1"}) + "\n")
    (tmp_path / "fleet.yaml").write_text(
        "name: bad\nexperts:\n  - {name: ja, task: job-analyzer, seed_data: seed.jsonl, eval_data: eval.jsonl}\n"
    )
    proc = _cli("run", "fleet.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: {tmp_path / 'seed.jsonl'}:1: duplicate-id: id is used by more than one record (got 'a1') (and 1 more)"
    ]
    assert not (tmp_path / "runs").exists()


def test_data_validate_lists_every_bad_line(tmp_path: Path) -> None:
    bad = {**REC, "id": "a2", "messages": [{"role": "assistant", "content": "hi"}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(REC) + "\n" + json.dumps(bad) + "\n{oops\n")
    proc = _cli("data", "validate", "d.jsonl", "--task", "job-analyzer", cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "error: d.jsonl:3: json: Expecting property name enclosed in double quotes"
    )
    (tmp_path / "d.jsonl").write_text(json.dumps(REC) + "\n" + json.dumps(bad) + "\n")
    proc = _cli("data", "validate", "d.jsonl", "--task", "job-analyzer", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0].startswith("d.jsonl:2: role-order: ")


def test_help_explains_every_command(tmp_path: Path) -> None:
    proc = _cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for command in ("spec", "data", "base", "compile", "run", "serve"):
        assert command in proc.stdout


def test_run_refuses_an_unknown_expert(tmp_path: Path) -> None:
    (tmp_path / "seed.jsonl").write_text(json.dumps(REC) + "\n")
    (tmp_path / "fleet.yaml").write_text(
        "name: f\nexperts:\n  - {name: ja, task: job-analyzer, seed_data: seed.jsonl, eval_data: seed.jsonl}\n"
    )
    proc = _cli("run", "fleet.yaml", "--expert", "nope", cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == "error: fleet.yaml: experts: no expert named nope; the spec has ja"
    )
    assert not (tmp_path / "runs").exists()


def test_the_runtime_entry_point_is_lorafleet_serve() -> None:
    """`python -m lorafleet.serve.runtime` (the runtime image) and `lorafleet serve` take one option set."""
    from typer.main import get_command

    from lorafleet.cli import app
    from lorafleet.commands.serve import standalone_app

    serve = get_command(app).commands["serve"]
    runtime = get_command(standalone_app())
    assert [p.opts for p in runtime.params] == [p.opts for p in serve.params]
    assert {"--fault", "--adapter-cache", "--lora-backend", "--routes"} <= {
        o for p in serve.params for o in p.opts
    }


def test_the_router_entry_point_is_lorafleet_router() -> None:
    """`python -m lorafleet.serve.router` (the KServe transformer) and `lorafleet router` take
    one option set, including the arguments KServe appends to a transformer's command."""
    from typer.main import get_command

    from lorafleet.cli import app
    from lorafleet.commands.router import standalone_app

    router = get_command(app).commands["router"]
    transformer = get_command(standalone_app())
    assert [p.opts for p in transformer.params] == [p.opts for p in router.params]
    kserve_args = ["--host", "0.0.0.0", "--model_name", "writer"]
    kserve_args += ["--predictor_host", "writer-predictor.ns", "--http_port", "8080"]
    params = transformer.make_context("router", kserve_args).params
    assert (params["upstream"], params["port"], params["host"]) == (
        "writer-predictor.ns",
        8080,
        "0.0.0.0",
    )


def test_compile_writes_to_the_working_directory_never_the_committed_golden(
    tmp_path: Path,
) -> None:
    from lorafleet.pipelines.compile import GOLDEN

    before = GOLDEN.stat().st_mtime_ns, GOLDEN.read_bytes()
    done = _cli("compile", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "fleet_pipeline.yaml").read_text().startswith("# PIPELINE DEFINITION")
    assert (GOLDEN.stat().st_mtime_ns, GOLDEN.read_bytes()) == before


def test_version() -> None:
    from lorafleet import __version__

    done = subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout == f"lorafleet {__version__}\n"


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_spec_check_json_is_one_object_on_stdout(tmp_path: Path) -> None:
    # Given the demo spec, and a copy whose profile is one deploy render cannot serve
    ok = _cli("spec", "check", str(EXAMPLES / "fleet.yaml"), "--json", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["ok"] is True and result["errors"] == []
    assert result["name"] == "work-marketplace" and "job-analyzer" in result["experts"]
    spec = (EXAMPLES / "fleet.yaml").read_text().replace("profile: local", "profile: gcp")
    (tmp_path / "fleet.yaml").write_text(spec)
    (tmp_path / "data").symlink_to(EXAMPLES / "data")
    # When checked with --json
    bad = _cli("spec", "check", "fleet.yaml", "--json", cwd=tmp_path)
    # Then the JSON names each problem's file, line and field; the lines go to stderr, exit 2
    assert bad.returncode == 2
    result = json.loads(bad.stdout)
    assert result["ok"] is False and result["name"] == "work-marketplace"
    fields = [e["field"] for e in result["errors"]]
    assert fields == [
        "serving.storage.gcp_service_account",
        "serving.base_uri",
        "serving.adapter_store",
    ]
    assert {e["file"] for e in result["errors"]} == {"fleet.yaml"}
    # A field the spec does not write is shown where its block is: the serving block.
    serving_line = spec.splitlines().index("serving:") + 1
    assert serving_line <= result["errors"][0]["line"] <= serving_line + 3
    assert bad.stderr.splitlines()[0].startswith("error: fleet.yaml:")


def test_rollout_status_json_is_the_state_on_stdout(tmp_path: Path) -> None:
    from lorafleet.fleet import CanaryPolicy
    from lorafleet.rollout.state import RolloutState, Target
    from lorafleet.rollout.store import FileStore

    # Given a rollout kept in a local state folder
    target = Target(
        route="writer", stable="writer-v1", canary="writer-v2", router_urls=["http://r:8080"]
    )
    FileStore(tmp_path / "states").create(
        RolloutState(name="writer", target=target, policy=CanaryPolicy(steps=[10, 100]))
    )
    # When its status is asked for with --json
    done = _cli("rollout", "status", "writer", "--json", "--state-dir", "states", cwd=tmp_path)
    # Then stdout is its state as JSON, and nothing else
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout)
    assert state["name"] == "writer" and state["phase"] == "Progressing"


def test_submit_to_a_closed_port_is_one_line_in_seconds(tmp_path: Path) -> None:
    import socket
    import time

    # Given a local port nothing listens on (bound, then closed) and a spec with data by URI
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "fleet.yaml").write_text(
        "apiVersion: lorafleet/v1\nname: tiny\nbase: {model: demo}\nexperts:\n"
        "  - {name: writer, task: proposal-writer, seed_data: s3://bucket/seed.jsonl,"
        " eval_data: s3://bucket/eval.jsonl}\n"
    )
    host = f"http://127.0.0.1:{port}"
    # When submitted there
    started = time.monotonic()
    done = _cli("submit", "fleet.yaml", "--host", host, cwd=tmp_path)
    # Then one line names the host and why, exit 2, no retry warnings, in seconds
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: {host}: cannot reach Kubeflow Pipelines: connection to port {port} refused"
    ]
    assert time.monotonic() - started < 30


def test_serve_help_shows_no_bool_type_and_whole_defaults(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", "serve", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "100", "TERM": "dumb"},
    )
    assert done.returncode == 0, done.stderr
    lineage = next(line for line in done.stdout.splitlines() if "--require-lineage" in line)
    assert "<bool>" not in lineage and "--no-require-lineage" not in done.stdout
    assert "[default: LORAFLEET_ADMIN_TOKEN]" in done.stdout
    assert "NAME=SOURCE" in done.stdout
