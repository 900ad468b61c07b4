"""Small helpers the component bodies share: artifact I/O and KFP UI metrics.

Kept apart from :mod:`lorafleet.stages` because they know about KFP artifact objects.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lorafleet.io import atomic_write_json, atomic_write_text

__all__ = [
    "base_path",
    "export_base",
    "gate_markdown",
    "limit_threads",
    "log_metrics",
    "read_json",
    "write_json",
    "write_markdown",
]

REF_FILE = "MODEL_REF"


def export_base(spec, base) -> None:
    """Put the base model into the ``base`` artifact: a copy of a demo build, else a reference."""
    from lorafleet.base import fingerprint_model
    from lorafleet.stages import build_base

    model = build_base(spec)
    out = Path(base.path)
    if spec.base.model == "demo":
        shutil.copytree(model, out, dirs_exist_ok=True)
    else:
        # Real bases are large: pass a reference; every pod loads from the hub or a mounted path.
        out.mkdir(parents=True, exist_ok=True)
        (out / REF_FILE).write_text(model + "\n")
    base.metadata.update({"model": spec.base.model, "fingerprint": fingerprint_model(model)})


def limit_threads() -> None:
    """Share the CPU between experts that run side by side.

    ``LORAFLEET_THREADS_PER_TASK`` is set by the local runner, which runs two loop
    iterations at once; in a cluster each pod has its own CPUs and it is unset.
    """
    import os

    n = os.environ.get("LORAFLEET_THREADS_PER_TASK")
    if n:
        import torch

        torch.set_num_threads(int(n))


def base_path(base) -> str:
    """The loadable base: the artifact directory, or the reference it holds."""
    ref = Path(base.path) / REF_FILE
    return ref.read_text().strip() if ref.is_file() else base.path


def read_json(artifact) -> dict:
    return json.loads(Path(artifact.path).read_text())


def write_json(artifact, obj: dict) -> None:
    atomic_write_json(artifact.path, obj)


def write_markdown(artifact, text: str) -> None:
    atomic_write_text(artifact.path, text)


def log_metrics(metrics, numbers: dict[str, float]) -> None:
    """Log flat numbers (:func:`lorafleet.report.kfp_metrics` and friends) to a KFP Metrics
    artifact, for the KFP UI's metrics view."""
    for name, value in numbers.items():
        metrics.log_metric(name, value)


def gate_markdown(report: dict) -> str:
    verdict = "PASSED" if report["gate_passed"] else "FAILED"
    rows = "\n".join(
        f"| {r['rule']} | {'pass' if r['passed'] else 'FAIL'} | {r['value']} | {r['threshold']} |"
        for r in report["gate_rules"]
    )
    return f"## Gate for `{report['expert']}`: {verdict}\n\n| rule | result | value | threshold |\n|---|---|---|---|\n{rows}\n"
