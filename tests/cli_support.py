"""Running the real ``lorafleet`` CLI in a subprocess, as a user's shell would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_lorafleet(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """``python -m lorafleet.cli ARGS`` in ``cwd``; text output captured."""
    return subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
