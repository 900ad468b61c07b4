"""Compile the fleet pipeline to IR YAML, with the package version pins stripped for goldens."""

import re
import tempfile
from pathlib import Path

from kfp import compiler

from lorafleet.io import atomic_write_text
from lorafleet.pipelines.fleet_pipeline import fleet_pipeline

__all__ = ["GOLDEN", "compile_fleet", "normalize"]

# The committed IR (a golden file): users upload it in the KFP UI.
GOLDEN = Path(__file__).resolve().parent / "fleet_pipeline.yaml"

_SDK_PIN = re.compile(r"^(\s*sdkVersion:\s*)kfp-\S+$", re.MULTILINE)


def normalize(text: str) -> str:
    """Drop what changes with the installed kfp version, not with our pipeline."""
    return _SDK_PIN.sub(r"\1kfp", text)


def compile_fleet(out: str | Path) -> Path:
    """Compile ``fleet_pipeline`` to ``out`` (written atomically)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pipeline.yaml"
        compiler.Compiler().compile(fleet_pipeline, str(path))
        return atomic_write_text(out, normalize(path.read_text()))
