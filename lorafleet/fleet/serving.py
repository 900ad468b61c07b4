"""How the fleet is served: runtime, cluster profile, storage identity and autoscaling."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lorafleet.fleet.common import SLUG, StrictModel
from lorafleet.fleet.platform import Toleration

__all__ = ["ServingAutoscaling", "ServingSpec", "ServingStorage"]


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
    """KServe autoscaling knobs of the predictor."""

    min_replicas: int = Field(
        1, ge=1, description="replicas kept running (RawDeployment mode: no scale to zero)"
    )
    max_replicas: int = Field(2, ge=1)
    scale_metric: Literal["concurrency", "rps", "cpu", "memory"] = "concurrency"
    scale_target: int = Field(8, ge=1, description="target value of scale_metric per replica")

    @model_validator(mode="after")
    def _bounds(self) -> ServingAutoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ServingSpec(StrictModel):
    """How the fleet is served."""

    runtime: Literal["lorafleet", "vllm"] = "lorafleet"
    profile: Literal["local", "aws", "gcp", "onprem"] = "local"
    gpus: int = Field(0, ge=0)
    # = lorafleet.serve.batching.MAX_BATCH_SIZE (not imported: the spec needs no torch).
    max_batch_size: int = Field(64, ge=1)
    max_lora_rank: int = Field(64, ge=1)
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
        None, ge=0, le=100, description="ISVC revision canary"
    )

    @model_validator(mode="after")
    def _runtime(self) -> ServingSpec:
        if self.runtime == "vllm" and self.gpus < 1:
            raise ValueError("runtime 'vllm' needs gpus >= 1")
        return self
