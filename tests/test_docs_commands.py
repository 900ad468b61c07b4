"""Every shell command in README.md and docs/*.md runs as written, or says why it cannot here.

Commands are the lines of fenced blocks tagged ``bash`` (``sh``, ``shell``, ``console``),
backslash continuations joined and trailing ``# comments`` dropped. Each one either runs, in
doc order, in a temporary copy of what the docs name (``examples/``, a registry under
``runs/registry`` as ``make demo`` leaves it, ``.venv`` linked), or is listed in
:data:`EXCEPTIONS` with the reason. A new command is therefore either tested or explained,
and an exception whose command left the docs fails here too. Untagged blocks are diagrams or
output; one that starts like a command must be tagged (``bash``, or ``text`` for a synopsis).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)
COMMAND_WORDS = ("lorafleet ", "kubectl ", "python ", "curl ", "make ", "docker ", "helm ")

# Placeholders the docs use for "your own file": a copy of a shipped one stands in.
PLACEHOLDERS = {"my-fleet.yaml": "examples/fleet-cluster.yaml"}

CLUSTER = "needs a Kubernetes cluster (tests/rollout cover it against kmock's emulator)"
S3 = "needs the S3 registry it names (tests/test_registry_s3.py covers these on moto)"
EXCEPTIONS = {
    "make demo": "minutes long: CI's demo job runs it",
    "make test": "the whole test suite, this test included",
    "docker build -f components/Dockerfile -t ghcr.io/lorafleet/lorafleet:0.1.0 .": (
        "needs docker and minutes: tests/images build the images where docker is present"
    ),
    "docker build -f lorafleet/serve/Dockerfile -t ghcr.io/lorafleet/lorafleet-runtime:0.1.0 .": (
        "needs docker and minutes: tests/images build the images where docker is present"
    ),
    "lorafleet submit examples/fleet-cluster.yaml --host http://ml-pipeline-ui.kubeflow "
    "--profile aws [--namespace team-ml] [--service-account lorafleet-pipeline]": (
        "needs a Kubeflow Pipelines endpoint and S3 (tests/pipelines/test_submit.py fakes both)"
    ),
    "lorafleet spec stage examples/fleet-cluster.yaml --profile aws > staged.yaml": (
        "uploads to the profile's S3 bucket (tests/test_staging.py covers staging on moto)"
    ),
    "lorafleet spec stage my-fleet.yaml --to s3://ml-data/lorafleet --out staged.yaml": (
        "uploads to S3 (tests/test_staging.py covers staging on moto)"
    ),
    "lorafleet spec stage examples/fleet-cluster.yaml --profile onprem --json": (
        "uploads to the in-cluster MinIO the profile names"
    ),
    "lorafleet registry list writer --registry s3://ml/registry --json": S3,
    "lorafleet registry show writer --registry s3://ml/registry": S3,
    "lorafleet registry promote writer v4 --registry s3://ml/registry --expect v3": S3,
    "lorafleet registry prune writer --keep 5 --dry-run --registry s3://ml/registry": S3,
    "kubectl lorafleet canary status proposal-writer -n lorafleet": CLUSTER,
    "kubectl lorafleet canary pause proposal-writer": CLUSTER,
    "kubectl lorafleet canary promote proposal-writer": CLUSTER,
    "kubectl lorafleet canary rollback proposal-writer": CLUSTER,
    "kubectl lorafleet canary status proposal-writer -o json | jq .last_analysis.canary": CLUSTER,
    "kubectl lorafleet canary start writer --route writer --stable writer-v1 --canary writer-v2 "
    "--router-service marketplace-prod-transformer:8080": CLUSTER,
    "python -m lorafleet.serve.runtime --base BASE --adapter writer-v1=DIR1 "
    "--adapter writer-v2=DIR2 --fault writer-v2:error_rate=0.3,added_latency_ms=500": (
        "a server that runs until stopped, on a trained base (tests/serve run it)"
    ),
    'curl -X PUT localhost:8080/admin/faults/writer-v2 -H "authorization: Bearer '
    '$LORAFLEET_ADMIN_TOKEN" -d \'{"error_rate": 0.3}\'': (
        "talks to the server above (tests/serve/ cover /admin/faults)"
    ),
    "lorafleet serve --base BASE_DIR --adapter proposal-writer-v3=registry/proposal-writer/v3 "
    "--adapter proposal-writer-v4=s3://adapters/proposal-writer/v4 --routes routes.json "
    "--max-batch-size 16 --max-queue 256": (
        "a server that runs until stopped, on a trained base and an S3 adapter (tests/serve)"
    ),
    "make vllm-env": (
        "installs vLLM's CPU build (a minute, 1.3 GB): `make test` builds it first and runs "
        "the vllm-marked tests with it"
    ),
    ".venv/bin/python -m lorafleet.serve.vllm_front --port 8080 --vllm-python "
    ".venv-vllm/bin/python --adapter job-analyzer=registry/job-analyzer/v3 --model BASE_DIR "
    "--served-model-name base --enable-lora --max-loras 2 --max-lora-rank 16 --max-num-seqs 64 "
    "--dtype float32": (
        "a server that runs until stopped, vLLM behind it (make e2e-vllm and "
        "tests/serve/test_vllm_front.py run it)"
    ),
    "python -m lorafleet.serve.router --upstream http://predictor:8080 --routes routes.json "
    "--port 8080": "a server that runs until stopped (tests/serve cover the router)",
    "lorafleet train run examples/fleet.yaml --expert job-analyzer --base BASE_DIR "
    "--train-set train.jsonl --output out/job-analyzer": (
        "trains on a built base for minutes (tests/train and the e2e tests train)"
    ),
    "lorafleet train submit fleet.yaml --expert proposal-writer --base /data/base "
    "--train-set /data/proposal-writer/train.jsonl --output /data/proposal-writer/adapter": CLUSTER,
}


def _commands(text: str) -> list[str]:
    """The commands of one shell block: continuations joined, comments and prompts dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    commands = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#\s.*$", "", line).strip()
        line = " ".join(line.removeprefix("$ ").split())
        if line:
            commands.append(line)
    return commands


def documented_commands() -> list[tuple[str, int, str]]:
    """``(doc, line, command)`` for every command in a shell block, in doc order."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for block in FENCE.finditer(text):
            if block.group(1) in SHELL:
                line = text.count("\n", 0, block.start()) + 1
                for command in _commands(block.group(2)):
                    found.append((str(doc.relative_to(ROOT)), line, command))
    return found


def test_untagged_blocks_are_not_commands() -> None:
    untagged = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for block in FENCE.finditer(text):
            if not block.group(1) and block.group(2).lstrip().startswith(COMMAND_WORDS):
                line = text.count("\n", 0, block.start()) + 1
                untagged.append(f"{doc.relative_to(ROOT)}:{line}")
    assert untagged == [], "tag these blocks bash (a command) or text (a synopsis, an output)"


def test_every_exception_is_still_documented() -> None:
    documented = {command for _, _, command in documented_commands()}
    assert documented, "the docs hold shell commands"
    assert sorted(set(EXCEPTIONS) - documented) == []


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A folder laid out like a clone after ``make demo``: examples, a registry, the venv."""
    from lorafleet.registry import Registry

    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parents[1])
    for name, source in PLACEHOLDERS.items():
        shutil.copy(tmp_path / source, tmp_path / name)
    (tmp_path / "data").symlink_to(tmp_path / "examples/data")  # my-fleet.yaml's data
    # The demo registry: v1 of every expert, trained on a base built by a run.
    base = tmp_path / "runs/demo/build-base/base"
    base.mkdir(parents=True)
    adapter = tmp_path / "runs/demo/adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"\0")
    registry = Registry(tmp_path / "runs/registry")
    for expert in ("proposal-writer", "job-analyzer", "profile-reviewer"):
        registry.register(expert, adapter, {"base": {"model": str(base)}}, lambda v: v)
    (tmp_path / "tmp").mkdir()
    return tmp_path


def test_documented_commands_run_as_written(workdir: Path) -> None:
    # Given every documented command that is not an exception, in doc order
    runnable = [c for c in documented_commands() if c[2] not in EXCEPTIONS]
    assert len(runnable) >= 10, "the docs' everyday commands run here"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "LORAFLEET_ROLLOUT_DIR": str(workdir / ".lorafleet/rollouts"),
    }
    failures = []
    for doc, line, command in runnable:
        # /tmp paths go to this test's own folder: parallel runs must not share files.
        shell = command.replace("/tmp/", f"{workdir}/tmp/")
        # When it runs in the copy
        done = subprocess.run(
            ["bash", "-c", shell],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            failures.append(f"{doc}:{line}: {command}\n  exit {done.returncode}: {done.stderr}")
    # Then each succeeds
    assert failures == [], "\n".join(failures)
