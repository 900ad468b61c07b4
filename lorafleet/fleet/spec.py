"""The whole fleet: its experts, and the cross-field rules that join the parts."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from lorafleet.errors import StorageError
from lorafleet.fleet.base_model import BaseSpec
from lorafleet.fleet.canary import CanaryPolicy
from lorafleet.fleet.common import SLUG, StrictModel
from lorafleet.fleet.data import CurationSettings, DataRules, SynthesisSettings
from lorafleet.fleet.evaluation import GatePolicy
from lorafleet.fleet.platform import PipelineSpec
from lorafleet.fleet.serving import ServingSpec
from lorafleet.fleet.tasks import (
    TaskDefinition,
    check_task,
    resolve_task,
    shipped_task,
    unknown_task_message,
)
from lorafleet.fleet.training import LoraSettings, TrainingSettings, check_sharding
from lorafleet.storage import parse_location

__all__ = ["DATA_FIELDS", "SHA256", "ExpertSpec", "FleetSpec", "RegistrySpec", "is_local_data"]

DATA_FIELDS = ("seed_data", "eval_data")
"""An expert's data files; each may carry its digest in ``<field>_sha256``."""

SHA256 = r"^[0-9a-f]{64}$"

_DATA_HELP = (
    "a local path (relative to the spec file) or a URI: s3://BUCKET/KEY, gs://BUCKET/KEY, "
    "pvc://CLAIM/PATH, file:///PATH"
)
_DIGEST_HELP = "hex SHA-256 of the file; the validate step refuses other content"


def is_local_data(location: str) -> bool:
    """Whether a data location is a file on this machine (a path or ``file://``), not a store.

    Raises:
        StorageError: If ``location`` is not a valid location.
    """
    return parse_location(location).scheme == "file"


def _check_location(value: object) -> object:
    """A path-like becomes its text; text must be a location the storage layer can read."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        try:
            parse_location(value)
        except StorageError as error:
            raise ValueError(error.reason) from None
    return value


class ExpertSpec(StrictModel):
    """One task-specific expert."""

    name: str = Field(pattern=SLUG)
    task: str
    seed_data: str = Field(description=_DATA_HELP)
    seed_data_sha256: str | None = Field(None, pattern=SHA256, description=_DIGEST_HELP)
    eval_data: str = Field(description=_DATA_HELP)
    eval_data_sha256: str | None = Field(None, pattern=SHA256, description=_DIGEST_HELP)
    data: DataRules = Field(default_factory=DataRules)
    synthesis: SynthesisSettings = Field(default_factory=SynthesisSettings)
    curation: CurationSettings = Field(default_factory=CurationSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    gate: GatePolicy = Field(default_factory=GatePolicy)

    _task = field_validator("task")(check_task)
    _data = field_validator(*DATA_FIELDS, mode="before")(_check_location)
    _definition: TaskDefinition | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _sharding(self) -> ExpertSpec:
        check_sharding(self.lora, self.training)
        return self

    @property
    def task_definition(self) -> TaskDefinition:
        """The expert's task as declared: by the fleet spec, else the shipped one of its name.

        Raises:
            LorafleetError: No shipped task has that name (an expert outside a fleet spec).
        """
        if self._definition is None:
            self._definition = resolve_task(self.task)
        return self._definition

    @property
    def max_new_tokens(self) -> int:
        """The generation budget of its evaluation: the gate's, else the task's."""
        return self.gate.max_new_tokens or self.task_definition.generation.max_new_tokens


class RegistrySpec(StrictModel):
    """Where registered adapters are kept."""

    uri: str = Field(
        ".lorafleet/registry", description="a directory (relative to the spec) or s3:// gs://"
    )


class FleetSpec(StrictModel):
    """The whole fleet."""

    api_version: Literal["lorafleet/v1"] = Field("lorafleet/v1", alias="apiVersion")
    name: str = Field(pattern=SLUG)
    base: BaseSpec = Field(default_factory=BaseSpec)
    tasks: list[TaskDefinition] = Field(
        default_factory=list,
        description="task definitions (inline, or a YAML file's path in the spec file); an "
        "expert whose task is not declared here gets the shipped task of that name",
    )
    experts: list[ExpertSpec] = Field(min_length=1)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    canary: CanaryPolicy = Field(default_factory=CanaryPolicy)
    registry: RegistrySpec = Field(default_factory=RegistrySpec)
    pipeline: PipelineSpec = Field(default_factory=PipelineSpec)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _cross(self) -> FleetSpec:
        names = [e.name for e in self.experts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"expert names must be unique; repeated: {', '.join(dupes)}")
        too_big = [e.name for e in self.experts if e.lora.r > self.serving.max_lora_rank]
        if too_big:
            raise ValueError(f"lora.r exceeds serving.max_lora_rank for: {', '.join(too_big)}")
        declared = [t.name for t in self.tasks]
        dupes = sorted({n for n in declared if declared.count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique; repeated: {', '.join(dupes)}")
        by_name = {t.name: t for t in self.tasks}
        for e in self.experts:
            if e.task not in by_name:
                try:  # the shipped definition travels with the spec (cache keys, pods)
                    by_name[e.task] = shipped_task(e.task)
                except KeyError:
                    raise ValueError(
                        unknown_task_message(e.task, dict.fromkeys(declared))
                    ) from None
                self.tasks.append(by_name[e.task])
            e._definition = by_name[e.task]
        return self

    def on_profile(self, profile: str) -> FleetSpec:
        """The fleet as cluster ``profile`` serves it: ``serving`` replaced by
        ``serving.on(profile)`` (its ``serving.profiles`` entry applied); the rest shared."""
        return self.model_copy(update={"serving": self.serving.on(profile)})

    def task_of(self, expert: ExpertSpec | str) -> TaskDefinition:
        """The task definition of an expert (or of the expert called ``expert``)."""
        return (self.expert(expert) if isinstance(expert, str) else expert).task_definition

    def expert(self, name: str) -> ExpertSpec:
        """The expert called ``name``."""
        for e in self.experts:
            if e.name == name:
                return e
        raise KeyError(name)
