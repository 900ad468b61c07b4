"""What each pipeline step reads of the spec: its *view*, and nothing else.

A KFP step's cache key is its component and its inputs. Were every step handed the whole
spec, any edit (a canary step, a serving flag) would change every key and rerun all
training. Each step is handed its view instead: the fleet spec reduced to the one expert
it works on and the fields the step reads, everything else at its default. An edit then
reruns exactly the steps that read the edited field:

=========  ===============================================================================
view       what it keeps
=========  ===============================================================================
base       ``base``; for the demo base, every expert's seed data digest (its corpus)
data       the expert's data files and digests, ``data``, ``synthesis``, ``curation``; its task
train      the expert's ``lora`` and ``training`` (and ``serving.max_lora_rank``, which bounds
           ``lora.r``), ``base`` (its revision and dtype); its task by name only
evaluate   the expert's ``lora`` and ``gate``, ``registry`` (production is compared), ``base``;
           its task
gate       the expert's ``gate``; its task
=========  ===============================================================================

Steps with effects outside the pipeline (register, publish, deploy) are never cached and
read the whole spec. Data digests, filled in before the views are made, key the data
steps on the files' content rather than their names.
"""

from __future__ import annotations

from typing import Literal

from lorafleet.fleet.spec import FleetSpec
from lorafleet.fleet.tasks import TaskDefinition

__all__ = ["VIEWS", "step_view"]

View = Literal["base", "data", "train", "evaluate", "gate"]
VIEWS: tuple[View, ...] = ("base", "data", "train", "evaluate", "gate")

# Every expert keeps its identity and data locations (required fields); digests only where
# the step reads the files' content.
_IDENTITY = {"name", "task", "seed_data", "eval_data"}
_EXPERT_FIELDS: dict[str, set[str]] = {
    "base": _IDENTITY | {"seed_data_sha256"},
    "data": _IDENTITY | {"seed_data_sha256", "eval_data_sha256", "data", "synthesis", "curation"},
    "train": _IDENTITY | {"lora", "training"},
    "evaluate": _IDENTITY | {"lora", "gate"},
    "gate": _IDENTITY | {"gate"},
}
_FLEET_FIELDS: dict[str, set[str]] = {
    "base": {"base"},
    "data": set(),
    "train": {"base"},
    "evaluate": {"registry", "base"},
    "gate": set(),
}
# Steps that read the task's definition; the others only need its name to resolve.
_READS_TASK = {"data", "evaluate", "gate"}


def step_view(spec: FleetSpec, view: View, expert: str | None = None) -> FleetSpec:
    """The spec as ``view``'s steps see it.

    Args:
        spec: the whole fleet.
        view: one of :data:`VIEWS`.
        expert: the expert the step works on (every expert for ``base``).

    Returns:
        A valid fleet spec holding only what the view keeps; its JSON is the step's input.
    """
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; one of {', '.join(VIEWS)}")
    experts = spec.experts if view == "base" else [spec.expert(expert)]
    fields = _EXPERT_FIELDS[view]
    if view == "base" and spec.base.model != "demo":
        fields = _IDENTITY  # only the demo base is built from the seeds
    tasks = []
    for e in experts:
        task = e.task_definition
        if view not in _READS_TASK:
            task = TaskDefinition(name=task.name)  # resolves the name, keys on nothing else
        if all(t.name != task.name for t in tasks):
            tasks.append(task)
    raw: dict = {
        "apiVersion": spec.api_version,
        "name": spec.name,
        "experts": [e.model_dump(include=fields) for e in experts],
        "tasks": [t.model_dump(by_alias=True) for t in tasks],
        **{f: getattr(spec, f).model_dump(by_alias=True) for f in _FLEET_FIELDS[view]},
    }
    if "lora" in fields:  # the rank must still fit what serving admits
        raw["serving"] = {"max_lora_rank": spec.serving.max_lora_rank}
    return FleetSpec.model_validate(raw)
