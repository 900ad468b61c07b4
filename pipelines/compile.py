"""Compile the fleet pipeline to IR YAML, with the package version pins stripped for goldens.

Without a profile the pipeline carries no cluster settings (``fleet_pipeline.yaml``); with one,
each step also carries that profile's Kubernetes settings (``fleet_pipeline-<profile>.yaml``).
Either can run another component image than :data:`~lorafleet.components.IMAGE` (``--image``),
best pinned by digest.
"""

import re
import tempfile
from pathlib import Path

from kfp import compiler
from kfp.dsl import PipelineTask

from lorafleet.errors import LorafleetError
from lorafleet.fleet import BaseSpec, PlatformProfile
from lorafleet.io import atomic_write_text
from lorafleet.pipelines.fleet_pipeline import build_fleet_pipeline, fleet_pipeline
from lorafleet.pipelines.platform import placer

__all__ = ["GOLDEN", "check_image", "compile_fleet", "normalize", "profile_golden"]

# The committed IR (a golden file): users upload it in the KFP UI.
GOLDEN = Path(__file__).resolve().parent / "fleet_pipeline.yaml"

_SDK_PIN = re.compile(r"^(\s*sdkVersion:\s*)kfp-\S+$", re.MULTILINE)
# An image reference: [registry/]path[:tag][@sha256:<64 hex>] (distribution/reference's grammar,
# lower-case path components).
_IMAGE = re.compile(
    r"^(?P<name>[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-]{1,2}[a-z0-9]+)*)*)"
    r"(:(?P<tag>[\w][\w.-]{0,127}))?(@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


def check_image(image: str) -> str:
    """``image`` if it is an image reference with a tag or a digest.

    Raises:
        LorafleetError: naming ``--image`` and the rule broken.
    """
    m = _IMAGE.match(image)
    if m is None:
        raise LorafleetError(
            f"--image {image}: not an image reference (REGISTRY/PATH:TAG or "
            "REGISTRY/PATH@sha256:<64 hex digits>)"
        )
    if not (m["tag"] or m["digest"]):
        raise LorafleetError(
            f"--image {image}: name a tag or, better, a digest (@sha256:...): without one "
            "every pod pulls whatever :latest is at the time"
        )
    return image


def normalize(text: str) -> str:
    """Drop what changes with the installed kfp version, not with our pipeline."""
    return _SDK_PIN.sub(r"\1kfp", text)


def profile_golden(profile: str) -> Path:
    """The committed IR of ``examples/fleet-cluster.yaml``'s ``profile`` (a golden file)."""
    return GOLDEN.with_name(f"{GOLDEN.stem}-{profile}.yaml")


def compile_fleet(
    out: str | Path,
    platform: PlatformProfile | None = None,
    image: str | None = None,
    base: BaseSpec | None = None,
) -> Path:
    """Compile the fleet pipeline to ``out`` (written atomically).

    Args:
        out: the IR YAML file to write.
        platform: one profile's Kubernetes settings (``pipeline.profiles.<profile>`` of a
            fleet spec); ``None`` compiles the committed pipeline with no cluster settings.
        image: the component image of every step (default: ``lorafleet.components.IMAGE``);
            a reference with a digest is written as given, so every pod runs those bytes.
        base: the same spec's base, with ``platform``: its ``hub_token_secret`` reaches the
            steps that load the base (:func:`~lorafleet.pipelines.platform.placer`).

    Returns:
        ``out`` as a path.

    Raises:
        LorafleetError: if ``image`` is not a reference with a tag or digest (:func:`check_image`).
    """
    if image is not None:
        check_image(image)
    if platform is None and image is None:
        pipeline = fleet_pipeline
    else:
        place = placer(platform, base) if platform is not None else None

        def pipeline_place(task: PipelineTask) -> PipelineTask:
            if place is not None:
                place(task)
            if image is not None:
                task.set_container_image(image)
            return task

        pipeline = build_fleet_pipeline(pipeline_place)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pipeline.yaml"
        compiler.Compiler().compile(pipeline, str(path))
        return atomic_write_text(out, normalize(path.read_text()))
