"""How the fleet is served: runtime, cluster profile, storage identity and autoscaling."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError, model_validator

from lorafleet.errors import first_problem
from lorafleet.fleet.common import SLUG, StrictModel
from lorafleet.fleet.platform import Toleration

__all__ = [
    "PROFILE_ENV",
    "VLLM_LORA_RANKS",
    "VLLM_VERSION",
    "ServingAutoscaling",
    "ServingProfile",
    "ServingSpec",
    "ServingStorage",
]

# The one vLLM release lorafleet serves with: the vLLM image is built on it
# (lorafleet/serve/Dockerfile.vllm), `lorafleet deploy render`, the chart and the overlays render
# for it, and tests/deploy/test_vllm_flags.py parses every rendered flag with its own parser.
VLLM_VERSION = "0.32.0"
# vLLM's --max-lora-rank choices (MaxLoRARanks, vllm/config/lora.py, VLLM_VERSION): any other
# value stops it at start-up.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The cluster profile a compiled pipeline's steps run on (set by `lorafleet compile --profile`):
# the resolve step reads the spec's serving block as that profile sees it (ServingSpec.on).
PROFILE_ENV = "LORAFLEET_PROFILE"
CLUSTER_PROFILES = Literal["local", "aws", "gcp", "onprem"]
# What KServe's autoscaler honours per deployment mode: RawDeployment makes an HPA, which scales
# on cpu or memory only (concurrency and rps are Knative's); Serverless makes a Knative KPA.
MODE_METRICS = {
    "RawDeployment": ("cpu", "memory"),
    "Serverless": ("concurrency", "rps", "cpu", "memory"),
}


class ServingStorage(StrictModel):
    """Cluster identity and storage access of the serving pods (see docs/deployment.md)."""

    role_arn: str = Field("", description="aws: IAM role for IRSA (eks.amazonaws.com/role-arn)")
    gcp_service_account: str = Field(
        "", description="gcp: Google service account for Workload Identity"
    )
    s3_endpoint: str = Field(
        "", description="onprem: S3-compatible endpoint (MinIO), e.g. http://minio.minio:9000"
    )
    credentials_secret: str = Field("", description="onprem: Secret with the MinIO/S3 access keys")
    pvc: str = Field("", description="onprem: PVC holding base and adapters (pvc:// URIs)")


class ServingAutoscaling(StrictModel):
    """KServe autoscaling knobs of the predictor (what each ``deployment_mode`` honours)."""

    min_replicas: int = Field(
        1, ge=1, description="replicas kept running (RawDeployment mode: no scale to zero)"
    )
    max_replicas: int = Field(2, ge=1)
    scale_metric: Literal["concurrency", "rps", "cpu", "memory"] = Field(
        "cpu",
        description="RawDeployment (HPA): cpu or memory; Serverless (Knative) also concurrency, rps",
    )
    scale_target: int = Field(
        80, ge=1, description="target per replica: % utilisation for cpu, else the metric's unit"
    )

    @model_validator(mode="after")
    def _bounds(self) -> ServingAutoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ServingProfile(StrictModel):
    """What serving differs in on one cluster profile: each setting given here replaces the
    serving block's own (whole: a ``storage`` or ``autoscaling`` given here is not merged
    with the block's) when the fleet is rendered, compiled or deployed for that profile; one
    left out (or null) keeps the block's."""

    gpus: int | None = Field(None, ge=0, description="per predictor pod on this profile")
    deployment_mode: Literal["RawDeployment", "Serverless"] | None = None
    namespace: str | None = Field(None, pattern=SLUG)
    base_uri: str | None = Field(None, description="where this profile's pods read the base")
    adapter_store: str | None = Field(
        None, description="where this profile's pods read the adapters (and register copies them)"
    )
    storage: ServingStorage | None = Field(None, description="this profile's storage identity")
    node_selector: dict[str, str] | None = Field(None, description="this profile's GPU node labels")
    tolerations: list[Toleration] | None = None
    autoscaling: ServingAutoscaling | None = None


class ServingSpec(StrictModel):
    """How the fleet is served."""

    runtime: Literal["lorafleet", "vllm"] = "lorafleet"
    profile: CLUSTER_PROFILES = "local"
    deployment_mode: Literal["RawDeployment", "Serverless"] = Field(
        "RawDeployment",
        description="KServe mode: RawDeployment (Deployment + HPA), or Serverless where Knative is installed",
    )
    gpus: int = Field(
        0,
        ge=0,
        description="per predictor pod; with runtime vllm, more than 1 is vLLM's tensor parallelism "
        "(--tensor-parallel-size), 0 its CPU build (warned: slow); the lorafleet runtime uses one",
    )
    # = lorafleet.serve.batching.MAX_BATCH_SIZE (not imported: the spec needs no torch).
    max_batch_size: int = Field(64, ge=1)
    max_lora_rank: int = Field(
        64,
        description=f"one of vLLM's --max-lora-rank choices: {', '.join(map(str, VLLM_LORA_RANKS))}",
    )
    adapter_store: str = Field(
        "", description="s3://, gs://, pvc:// or a directory; empty = registry"
    )
    # Cluster serving (`lorafleet deploy render`); every field has a default for local runs.
    namespace: str = Field(
        "lorafleet", pattern=SLUG, description="namespace of every rendered object"
    )
    base_uri: str = Field(
        "", description="storage URI of the base weights; empty = hf://<base.model>"
    )
    storage: ServingStorage = Field(default_factory=ServingStorage)
    node_selector: dict[str, str] | None = Field(
        None, description="GPU node labels; None = the profile's"
    )
    tolerations: list[Toleration] | None = Field(
        None, description="None = the profile's GPU taints"
    )
    autoscaling: ServingAutoscaling = Field(default_factory=ServingAutoscaling)
    router: bool = Field(
        False, description="put the lorafleet router in front as a KServe transformer"
    )
    canary_traffic_percent: int | None = Field(
        None, ge=0, le=100, description="ISVC revision canary (deployment_mode Serverless only)"
    )
    profiles: dict[CLUSTER_PROFILES, ServingProfile] = Field(
        default_factory=dict,
        description="profile -> the serving settings that differ there (storage, base_uri, "
        "adapter_store, GPUs, node labels...), so one spec renders on every cluster",
    )

    def on(self, profile: str) -> ServingSpec:
        """The serving block as ``profile`` sees it: its ``profiles`` entry applied, ``profile``
        set, and no ``profiles`` left (a view's view is itself).

        Raises:
            pydantic.ValidationError: if the combined settings break a serving rule.
        """
        own = self.profiles.get(profile)
        settings = self.model_dump(exclude={"profiles"})
        if own is not None:
            settings |= own.model_dump(exclude_none=True)
        return ServingSpec.model_validate({**settings, "profile": profile})

    @model_validator(mode="after")
    def _profiles_hold(self) -> ServingSpec:
        for name in self.profiles:
            try:
                self.on(name)
            except ValidationError as exc:
                raise ValueError(f"profiles.{name}: {first_problem(exc, '')}") from None
        return self

    @model_validator(mode="after")
    def _runtime(self) -> ServingSpec:
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(
                f"max_lora_rank {self.max_lora_rank}: vLLM accepts only "
                f"{', '.join(map(str, VLLM_LORA_RANKS))}"
            )
        if self.runtime == "lorafleet" and self.gpus > 1:
            raise ValueError(
                f"gpus {self.gpus}: the lorafleet runtime serves on one device; a base that "
                "needs several GPUs is served with runtime: vllm (tensor parallelism over gpus)"
            )
        mode, auto = self.deployment_mode, self.autoscaling
        # KServe accepts these and then ignores them: refuse rather than render a no-op.
        if auto.scale_metric not in MODE_METRICS[mode]:
            raise ValueError(
                f"autoscaling.scale_metric {auto.scale_metric}: deployment_mode {mode} scales only "
                f"on {' or '.join(MODE_METRICS[mode])} (concurrency and rps need Serverless)"
            )
        if auto.scale_metric == "cpu" and auto.scale_target > 100:
            raise ValueError("autoscaling.scale_target: a cpu target is a percentage (1-100)")
        if self.canary_traffic_percent is not None and mode != "Serverless":
            raise ValueError(
                "canary_traffic_percent: only KServe's Serverless mode has revisions to split "
                "(set deployment_mode: Serverless, or use canary.mode: router)"
            )
        return self
