"""Kubernetes settings of the compiled pipeline's steps, per cluster profile."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lorafleet.fleet.common import StrictModel

__all__ = [
    "PIPELINE_STEPS",
    "PipelineSpec",
    "PlatformProfile",
    "PvcMount",
    "SecretEnv",
    "StepPlatform",
    "Toleration",
]


# The pipeline's step (task) names, as compiled: the keys of ``pipeline.profiles.<p>.steps``.
PIPELINE_STEPS = (
    "build-base",
    "validate-data",
    "plan-shards",
    "synthesize",
    "curate-shard",
    "curate",
    "train",
    "evaluate",
    "gate",
    "register",
    "reject",
    "publish",
    "deploy",
)


class Toleration(StrictModel):
    """A Kubernetes toleration for a step's pod (e.g. of a GPU node pool's taint)."""

    key: str | None = Field(
        None, description="the taint key; empty with operator Exists tolerates every taint"
    )
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = Field(None, description="the taint value (operator Equal)")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class PvcMount(StrictModel):
    """An existing PersistentVolumeClaim mounted into a step's pod."""

    claim: str = Field(min_length=1, description="the PVC's name, in the pipeline's namespace")
    mount_path: str = Field(pattern=r"^/", description="absolute path in the container")


class SecretEnv(StrictModel):
    """Keys of a Kubernetes Secret exposed to a step as environment variables."""

    secret: str = Field(min_length=1, description="the Secret's name")
    env: dict[str, str] = Field(min_length=1, description="secret key -> environment variable name")


class StepPlatform(StrictModel):
    """Where and with what a pipeline step's pod runs on Kubernetes."""

    accelerator_type: str | None = Field(
        None, description="e.g. nvidia.com/gpu (the resource name)"
    )
    accelerator_count: int = Field(
        1, ge=1, description="accelerators per pod, when accelerator_type is set"
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="node label -> value")
    tolerations: list[Toleration] = Field(default_factory=list)
    pvcs: list[PvcMount] = Field(default_factory=list)
    secrets: list[SecretEnv] = Field(default_factory=list)


class PlatformProfile(StrictModel):
    """Kubernetes settings of the compiled pipeline on one cluster profile."""

    all_steps: StepPlatform = Field(
        default_factory=StepPlatform, description="applied to every step"
    )
    steps: dict[Literal[PIPELINE_STEPS], StepPlatform] = Field(
        default_factory=dict, description="step name -> settings added on top of all_steps"
    )


class PipelineSpec(StrictModel):
    """How the fleet pipeline is compiled for Kubeflow Pipelines, per cluster profile."""

    profiles: dict[Literal["aws", "gcp", "onprem"], PlatformProfile] = Field(
        default_factory=dict, description="profile -> platform settings; 'local' needs none"
    )
