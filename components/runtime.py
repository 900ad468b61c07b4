"""Small helpers the component bodies share: artifact I/O, KFP UI metrics, and how an
expert's failure travels from step to step.

Kept apart from :mod:`lorafleet.stages` because they know about KFP artifact objects.

A per-expert step runs its stage through :func:`expert_step`: when the stage fails, every
output artifact of the step carries the expert's failure in its metadata
(:data:`FAILURE_KEY`), and the next step, finding it on an input, passes it on without
running. The steps of a failed expert so succeed, as KFP sees them, and the pipeline goes on
to ``publish`` and ``deploy`` the other experts.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lorafleet.io import atomic_write_json, atomic_write_text

__all__ = [
    "FAILURE_KEY",
    "base_path",
    "expert_step",
    "export_base",
    "gate_markdown",
    "limit_threads",
    "log_metrics",
    "mark_failed",
    "pinned_spec",
    "read_json",
    "upstream_failure",
    "write_json",
    "write_markdown",
]

FAILURE_KEY = "lorafleet_failure"
"""The artifact metadata key of an expert's failure (:func:`lorafleet.stages.stage_failure`)."""

REF_FILE = "MODEL_REF"
"""The reference a base artifact holds instead of weights: the model id or path on its first
line and, for a hub base, the commit its revision was pinned to on the second."""


def export_base(spec, base) -> None:
    """Put the base model into the ``base`` artifact: a copy of a demo build, else a reference.

    A hub base is downloaded into the Hugging Face cache here, once
    (:func:`lorafleet.base.prefetch_hub_base`), and the commit its revision stood for goes into
    the reference and the artifact's ``revision``: the later steps load that commit
    (:func:`pinned_spec`), even if the branch moves during the run.
    """
    from lorafleet.base import fingerprint_model, prefetch_hub_base
    from lorafleet.fleet import is_hub_id
    from lorafleet.stages import build_base

    model = build_base(spec)
    out = Path(base.path)
    commit = None
    if spec.base.model == "demo":
        shutil.copytree(model, out, dirs_exist_ok=True)
    else:
        # Real bases are large: pass a reference; every pod loads from the hub cache or a mounted path.
        if is_hub_id(model) and not Path(model).is_dir():
            commit = prefetch_hub_base(model, spec.base.revision)
        out.mkdir(parents=True, exist_ok=True)
        (out / REF_FILE).write_text("".join(f"{line}\n" for line in (model, commit) if line))
    base.metadata.update(
        {
            "model": spec.base.model,
            "fingerprint": fingerprint_model(model, commit or spec.base.revision),
        }
        | ({"revision": commit} if commit else {})
    )


def _reference(base) -> list[str]:
    ref = Path(base.path) / REF_FILE
    return [line.strip() for line in ref.read_text().splitlines()] if ref.is_file() else []


def pinned_spec(spec, base):
    """``spec`` with ``base.revision`` the commit the ``base`` artifact was pinned to, when it
    holds one (a hub base); else ``spec`` itself (a demo or local-folder base)."""
    commit = _reference(base)[1:]
    if not commit:
        return spec
    return spec.model_copy(update={"base": spec.base.model_copy(update={"revision": commit[0]})})


def upstream_failure(*artifacts) -> dict | None:
    """The failure an input artifact carries: an earlier step of the expert failed.

    Args:
        *artifacts: input artifacts, or lists of them (a ``dsl.Collected`` input).

    Returns:
        The first failure found, or ``None``.
    """
    for artifact in artifacts:
        for one in artifact if isinstance(artifact, list) else [artifact]:
            failure = (one.metadata or {}).get(FAILURE_KEY)
            if failure:
                return dict(failure)
    return None


def mark_failed(failure: dict, *outputs) -> None:
    """Make every output artifact carry ``failure``, and exist: a cluster's launcher uploads
    each output's file, and a missing one would fail the step after all. A file the stage
    did not write holds the failure as one line (what the KFP UI shows for it)."""
    line = f"{failure['expert']}: {failure['stage']} failed: {failure['error']}\n"
    for artifact in outputs:
        artifact.metadata[FAILURE_KEY] = failure
        path = Path(artifact.path)
        if not path.exists():
            atomic_write_text(path, line)


def expert_step(
    expert: str,
    stage: str,
    body: Callable[[], Any],
    inputs: Iterable = (),
    outputs: Iterable = (),
) -> tuple[Any, dict | None]:
    """Run one step of an expert: ``body`` (one call into :mod:`lorafleet.stages`), unless an
    input carries a failure; a failure of ``body`` is caught
    (:func:`lorafleet.stages.run_expert_stage`). Either way a failure marks every output
    (:func:`mark_failed`) instead of failing the step.

    Args:
        expert: the expert.
        stage: the step's stage name, as failures name it (``train``).
        body: what the step does.
        inputs: the input artifacts an earlier failure would be carried on.
        outputs: the output artifacts a failure is put on.

    Returns:
        ``(body's result, None)``, or ``(None, failure)``.
    """
    from lorafleet.stages import run_expert_stage

    failure = upstream_failure(*inputs)
    result = None
    if failure is None:
        result, failure = run_expert_stage(expert, stage, body)
    if failure is not None:
        mark_failed(failure, *outputs)
    return result, failure


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
    """The loadable base: the artifact directory, or the model id or path it refers to."""
    return next(iter(_reference(base)), base.path)


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
    failure = report.get("failure")
    if failure:
        return (
            f"## Gate for `{report['expert']}`: FAILED\n\n"
            f"The expert's `{failure['stage']}` step failed: {failure['error']}\n"
        )
    verdict = "PASSED" if report["gate_passed"] else "FAILED"
    rows = "\n".join(
        f"| {r['rule']} | {'pass' if r['passed'] else 'FAIL'} | {r['value']} | {r['threshold']} |"
        for r in report["gate_rules"]
    )
    return f"## Gate for `{report['expert']}`: {verdict}\n\n| rule | result | value | threshold |\n|---|---|---|---|\n{rows}\n"
