"""Kubernetes settings of the compiled pipeline's steps, per cluster profile."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from lorafleet.errors import StorageError
from lorafleet.fleet.common import SLUG, StrictModel
from lorafleet.storage import parse_location

__all__ = [
    "BASE_STEPS",
    "KUEUE_PRIORITY_LABEL",
    "KUEUE_QUEUE_LABEL",
    "NEVER_RETRIED_STEPS",
    "NON_IDEMPOTENT_STEPS",
    "PIPELINE_STEPS",
    "ModelCache",
    "PipelineSpec",
    "PlatformProfile",
    "ProfileStorage",
    "PvcMount",
    "SecretEnv",
    "StepPlatform",
    "Toleration",
]


# The pipeline's step (task) names, as compiled: the keys of ``pipeline.profiles.<p>.steps``.
PIPELINE_STEPS = (
    "resolve-fleet",
    "build-base",
    "expert-views",
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
    "fleet-status",
)

# The steps that load the base model, or resolve its hub revision for its fingerprint: on a
# cluster they may reach the hub, with the base's token, and share the profile's model cache.
BASE_STEPS = ("build-base", "train", "evaluate", "register", "publish")

# Steps whose effects live outside KFP's artifacts (a registry version, a smoke test, a
# rollout): a retry would repeat them, so they are never retried.
NON_IDEMPOTENT_STEPS = ("register", "publish", "deploy")
# Never retried either: the run's verdict, whose failure (an expert failed) a retry repeats.
NEVER_RETRIED_STEPS = (*NON_IDEMPOTENT_STEPS, "fleet-status")

# Kueue's labels: the LocalQueue a workload waits in, and its WorkloadPriorityClass.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"

# What KFP's set_cpu_*/set_memory_* accept (kfp.dsl.PipelineTask._validate_*_request_limit).
CPU = r"^([0-9]*[.])?[0-9]+m?$"
MEMORY = r"^[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$"


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
    cpu_request: str | None = Field(
        None, pattern=CPU, description="CPU cores requested, e.g. 2 or 500m (default: per step)"
    )
    cpu_limit: str | None = Field(None, pattern=CPU, description="CPU cores at most")
    memory_request: str | None = Field(
        None, pattern=MEMORY, description="memory requested, e.g. 8Gi (default: per step)"
    )
    memory_limit: str | None = Field(None, pattern=MEMORY, description="memory at most")
    retries: int | None = Field(
        None,
        ge=0,
        le=10,
        description="retries of a failed pod (default: 2); register, publish, deploy and "
        "fleet-status are never retried",
    )
    timeout_seconds: int | None = Field(
        None, ge=1, description="the pod's activeDeadlineSeconds (default: per step)"
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="default: Kubernetes' (IfNotPresent for a digest or tag)"
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Secrets (dockerconfigjson) to pull the step image"
    )
    shm_size: str | None = Field(
        None,
        pattern=MEMORY,
        description="a memory-backed /dev/shm of this size (an emptyDir of medium Memory; "
        "what it holds counts against memory_limit): PyTorch DataLoader workers and NCCL "
        "outgrow a container's 64 MiB default (default: 8Gi for train, none elsewhere)",
    )
    queue_name: str | None = Field(
        None,
        pattern=SLUG,
        description="Kueue LocalQueue the step's pod waits in for admission (pod label "
        "kueue.x-k8s.io/queue-name; needs Kueue's pod integration), e.g. for GPU steps",
    )
    priority_class: str | None = Field(
        None,
        pattern=SLUG,
        description="Kueue WorkloadPriorityClass of the step's pod (pod label "
        "kueue.x-k8s.io/priority-class; KFP cannot set a pod's priorityClassName): "
        "needs queue_name",
    )


class ProfileStorage(StrictModel):
    """Where the pipeline's pods on one cluster profile read and write shared objects.

    The steps of a run share nothing but KFP artifacts and this store: the submitting
    machine's disk is not there, so ``lorafleet submit`` stages local data files into
    ``<object_store>/data/`` before the run starts (see :mod:`lorafleet.staging`).
    """

    object_store: str | None = Field(
        None,
        description="URI prefix of the profile's object store: s3://BUCKET/PREFIX, "
        "gs://BUCKET/PREFIX or pvc://CLAIM/PATH; none = data must already be URIs",
    )
    endpoint: str | None = Field(
        None,
        pattern=r"^https?://[^\s/]+",
        description="S3 endpoint of an S3-compatible store (MinIO, on-prem), e.g. "
        "http://minio.minio:9000; none = AWS. Set as AWS_ENDPOINT_URL_S3 in every step",
    )

    @field_validator("object_store")
    @classmethod
    def _remote(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            scheme = parse_location(value).scheme
        except StorageError as error:
            raise ValueError(error.reason) from None
        if scheme == "file":
            raise ValueError(
                "must be s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or pvc://CLAIM/PATH: "
                "the pipeline's pods cannot read this machine's disk"
            )
        return value

    @model_validator(mode="after")
    def _endpoint_is_s3(self) -> ProfileStorage:
        if self.endpoint and not (self.object_store or "").startswith("s3://"):
            raise ValueError("endpoint is the S3 endpoint: it needs an s3:// object_store")
        return self

    @property
    def scheme(self) -> str | None:
        """``s3``, ``gs`` or ``pvc``; None when the profile names no store."""
        return parse_location(self.object_store).scheme if self.object_store else None


class ModelCache(StrictModel):
    """A PVC the steps that load the base share as their Hugging Face cache (``HF_HOME``).

    A hub base is downloaded once into it, then read by every later step and run, instead of
    once per step into each pod's own disk.
    """

    claim: str = Field(
        min_length=1,
        description="the PVC's name, in the pipeline's namespace: ReadWriteMany, as the "
        "experts' steps mount it at once, writable by the image's user (uid 10001), with "
        "room for the base's weights",
    )
    mount_path: str = Field(
        "/mnt/hf-cache",
        pattern=r"^/",
        description="where it is mounted; HF_HOME points here (the hub cache is <mount_path>/hub)",
    )
    offline: bool = Field(
        False,
        description="the cache was filled ahead and the cluster cannot reach the hub: the "
        "steps read only the cache (HF_HUB_OFFLINE=1); pin base.revision to a commit sha so "
        "no branch needs resolving. Default: the steps fetch what the cache lacks",
    )


class PlatformProfile(StrictModel):
    """Kubernetes settings of the compiled pipeline on one cluster profile."""

    storage: ProfileStorage = Field(
        default_factory=ProfileStorage, description="the object store the steps share"
    )
    model_cache: ModelCache | None = Field(
        None,
        description="a PVC mounted in the steps that load the base ("
        + ", ".join(BASE_STEPS)
        + ") as their Hugging Face cache; none = each step downloads a hub base again",
    )
    all_steps: StepPlatform = Field(
        default_factory=StepPlatform, description="applied to every step"
    )
    steps: dict[Literal[PIPELINE_STEPS], StepPlatform] = Field(
        default_factory=dict, description="step name -> settings added on top of all_steps"
    )
    _name: str | None = PrivateAttr(None)

    @property
    def name(self) -> str | None:
        """The profile's name (its key in ``pipeline.profiles``); None outside a spec."""
        return self._name

    @model_validator(mode="after")
    def _no_retry_of_effects(self) -> PlatformProfile:
        for step in NEVER_RETRIED_STEPS:
            own = self.steps.get(step)
            if own is not None and own.retries:
                why = (
                    "acts outside KFP (a registry version, a smoke test, a rollout)"
                    if step in NON_IDEMPOTENT_STEPS
                    else "fails only to report failed experts, which a retry reports again"
                )
                raise ValueError(f"steps.{step}.retries: {step} {why} and is never retried")
        return self

    @model_validator(mode="after")
    def _priority_needs_a_queue(self) -> PlatformProfile:
        for step in PIPELINE_STEPS:
            layers = [self.all_steps, self.steps.get(step)]
            priority = next((s for s in reversed(layers) if s and s.priority_class), None)
            if priority is not None and not any(s and s.queue_name for s in layers):
                where = "all_steps" if priority is self.all_steps else f"steps.{step}"
                raise ValueError(
                    f"{where}.priority_class: Kueue reads it only on a queued pod; set "
                    f"queue_name (in all_steps or steps.{step}) too"
                )
        return self

    @model_validator(mode="after")
    def _store_is_mounted(self) -> PlatformProfile:
        if self.storage.scheme == "pvc":
            claim = parse_location(self.storage.object_store).root
            if claim not in {m.claim for m in self.all_steps.pvcs}:
                raise ValueError(
                    f"storage.object_store is on claim '{claim}': "
                    "mount it in all_steps.pvcs so every step can read it"
                )
        return self

    @model_validator(mode="after")
    def _cache_mounted_once(self) -> PlatformProfile:
        cache = self.model_cache
        if cache is None:
            return self
        layers = [("all_steps", self.all_steps)]
        layers += [(f"steps.{s}", self.steps[s]) for s in BASE_STEPS if s in self.steps]
        for where, settings in layers:
            for pvc in settings.pvcs:
                if pvc.claim == cache.claim:
                    raise ValueError(
                        f"model_cache.claim: '{cache.claim}' is also in {where}.pvcs; a pod "
                        "mounts a claim once: give the cache its own claim"
                    )
                if pvc.mount_path == cache.mount_path:
                    raise ValueError(
                        f"model_cache.mount_path: {where}.pvcs mounts '{pvc.claim}' at "
                        f"{cache.mount_path} too: give the cache another path"
                    )
        return self

    def pvc_mounts(self, step: str) -> dict[str, str]:
        """Claim -> mount path of every PVC in ``step``'s pod (``all_steps``, then its own)."""
        own = self.steps.get(step)
        return {m.claim: m.mount_path for m in [*self.all_steps.pvcs, *(own.pvcs if own else [])]}


class PipelineSpec(StrictModel):
    """How the fleet pipeline is compiled for Kubeflow Pipelines, per cluster profile."""

    profiles: dict[Literal["aws", "gcp", "onprem"], PlatformProfile] = Field(
        default_factory=dict, description="profile -> platform settings; 'local' needs none"
    )

    @model_validator(mode="after")
    def _named(self) -> PipelineSpec:
        for name, profile in self.profiles.items():
            profile._name = name
        return self
