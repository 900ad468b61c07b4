"""The whole fleet: its experts, and the cross-field rules that join the parts."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from lorafleet.errors import StorageError
from lorafleet.fleet.base_model import BaseSpec
from lorafleet.fleet.canary import CanaryPolicy
from lorafleet.fleet.common import SLUG, StrictModel
from lorafleet.fleet.data import CurationSettings, DataRules, SynthesisSettings
from lorafleet.fleet.evaluation import GatePolicy
from lorafleet.fleet.platform import PipelineSpec
from lorafleet.fleet.serving import ServingSpec
from lorafleet.fleet.tasks import check_task
from lorafleet.fleet.training import LoraSettings, TrainingSettings
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
        return self

    def expert(self, name: str) -> ExpertSpec:
        """The expert called ``name``."""
        for e in self.experts:
            if e.name == name:
                return e
        raise KeyError(name)
