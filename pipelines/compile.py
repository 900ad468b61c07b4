"""Compile the fleet pipeline to IR YAML, with the package version pins stripped for goldens.

Without a profile the pipeline carries no cluster settings (``fleet_pipeline.yaml``); with one,
each step also carries that profile's Kubernetes settings (``fleet_pipeline-<profile>.yaml``).
"""

import re
import tempfile
from pathlib import Path

from kfp import compiler

from lorafleet.fleet import PlatformProfile
from lorafleet.io import atomic_write_text
from lorafleet.pipelines.fleet_pipeline import build_fleet_pipeline, fleet_pipeline
from lorafleet.pipelines.platform import placer

__all__ = ["GOLDEN", "compile_fleet", "normalize", "profile_golden"]

# The committed IR (a golden file): users upload it in the KFP UI.
GOLDEN = Path(__file__).resolve().parent / "fleet_pipeline.yaml"

_SDK_PIN = re.compile(r"^(\s*sdkVersion:\s*)kfp-\S+$", re.MULTILINE)


def normalize(text: str) -> str:
    """Drop what changes with the installed kfp version, not with our pipeline."""
    return _SDK_PIN.sub(r"\1kfp", text)


def profile_golden(profile: str) -> Path:
    """The committed IR of ``examples/fleet-cluster.yaml``'s ``profile`` (a golden file)."""
    return GOLDEN.with_name(f"{GOLDEN.stem}-{profile}.yaml")


def compile_fleet(out: str | Path, platform: PlatformProfile | None = None) -> Path:
    """Compile the fleet pipeline to ``out`` (written atomically).

    Args:
        out: the IR YAML file to write.
        platform: one profile's Kubernetes settings (``pipeline.profiles.<profile>`` of a
            fleet spec); ``None`` compiles the committed pipeline with no cluster settings.

    Returns:
        ``out`` as a path.
    """
    pipeline = fleet_pipeline if platform is None else build_fleet_pipeline(placer(platform))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pipeline.yaml"
        compiler.Compiler().compile(pipeline, str(path))
        return atomic_write_text(out, normalize(path.read_text()))
