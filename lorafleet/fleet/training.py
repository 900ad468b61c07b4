"""Training settings of an expert: the LoRA hyper-parameters, the recipe's knobs and where it
runs (in process, torchrun, or a Kubeflow TrainJob)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lorafleet.fleet.common import SLUG, StrictModel
from lorafleet.fleet.platform import (
    KUEUE_PRIORITY_LABEL,
    KUEUE_QUEUE_LABEL,
    MEMORY,
    PvcMount,
    Toleration,
)

__all__ = ["LoraSettings", "TrainCluster", "TrainingSettings", "check_sharding"]


class LoraSettings(StrictModel):
    """PEFT LoRA hyper-parameters."""

    r: int = Field(8, ge=1, le=256)
    alpha: int = Field(16, ge=1, description="usually 2 x r")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    use_rslora: bool = False
    use_dora: bool = False
    qlora: bool = Field(
        False, description="load the base in 4-bit (needs a CUDA GPU and bitsandbytes)"
    )


class TrainingSettings(StrictModel):
    """The LoRA training recipe's knobs."""

    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    learning_rate: float = Field(2e-3, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_seq_len: int = Field(768, ge=16)
    seed: int = 0
    packing: bool = Field(
        False, description="pack several examples per row (batch_size counts rows)"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations: less memory, ~30% slower"
    )
    checkpoint_every: int | None = Field(
        None, ge=1, description="save a resumable checkpoint every N steps"
    )
    keep_checkpoints: int = Field(2, ge=1, description="how many recent checkpoints to keep")
    # Where the trainer runs (docs/training.md): the recipe is the same everywhere.
    launcher: Literal["local", "torchrun", "trainjob"] = Field(
        "local",
        description="local: in process; torchrun: gpus_per_node ranks here (DDP, or FSDP: sharding); trainjob: a Kubeflow job on nodes x gpus_per_node",
    )
    nodes: int = Field(
        1, ge=1, description="nodes of a trainjob (more than 1 only with launcher trainjob)"
    )
    gpus_per_node: int = Field(
        1, ge=1, description="ranks per node: GPUs, or CPU processes without GPUs"
    )
    sharding: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every rank holds the whole base; fsdp: the frozen base and the adapter "
        "are sharded across all ranks (FSDP2), for a base one device cannot hold (not with "
        "lora.qlora)",
    )
    cluster: TrainCluster | None = Field(
        None, description="the Kubernetes side of launcher trainjob"
    )

    @property
    def world_size(self) -> int:
        """How many ranks the launcher starts: 1 in process, else nodes x gpus_per_node."""
        return 1 if self.launcher == "local" else self.nodes * self.gpus_per_node

    @model_validator(mode="after")
    def _launcher(self) -> TrainingSettings:
        if self.nodes > 1 and self.launcher != "trainjob":
            raise ValueError("nodes > 1 needs launcher: trainjob (one pod cannot span nodes)")
        if self.launcher == "trainjob" and self.cluster is None:
            raise ValueError("launcher trainjob needs a cluster block (image, namespace, volume)")
        if self.sharding == "fsdp" and self.world_size == 1:
            raise ValueError(
                "sharding fsdp shards the base across ranks and this run has one: use launcher "
                "torchrun or trainjob with nodes x gpus_per_node > 1, or sharding: ddp"
            )
        return self


class TrainCluster(StrictModel):
    """Where a ``trainjob`` runs: a Kubeflow Trainer TrainJob, or a PyTorchJob where Trainer is absent."""

    image: str = Field(
        min_length=1, description="container image with lorafleet installed (components/Dockerfile)"
    )
    namespace: str = Field("lorafleet", pattern=SLUG, description="namespace of the job")
    runtime: str = Field(
        "torch-distributed", min_length=1, description="the TrainJob's ClusterTrainingRuntime"
    )
    volume: PvcMount = Field(
        description="shared PVC holding base, data and outputs; job paths must be under mount_path"
    )
    accelerator: str | None = Field(
        "nvidia.com/gpu",
        description="resource name requested gpus_per_node times per node; null = CPU",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="node label -> value for the trainer pods"
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="e.g. of a GPU node pool's taint"
    )
    service_account: str | None = Field(None, description="ServiceAccount of the trainer pods")
    shm_size: str | None = Field(
        "8Gi",
        pattern=MEMORY,
        description="a memory-backed /dev/shm of this size in every trainer pod (DataLoader "
        "workers and NCCL outgrow a container's 64 MiB default); null: that default",
    )
    queue_name: str | None = Field(
        None,
        pattern=SLUG,
        description="Kueue LocalQueue the job waits in (label kueue.x-k8s.io/queue-name): "
        "Kueue admits all its nodes at once, or none",
    )
    priority_class: str | None = Field(
        None,
        pattern=SLUG,
        description="Kueue WorkloadPriorityClass of the job (label "
        "kueue.x-k8s.io/priority-class): needs queue_name",
    )
    timeout_s: float = Field(
        24 * 3600, gt=0, description="how long to wait for the job before giving up"
    )

    @model_validator(mode="after")
    def _priority_needs_a_queue(self) -> TrainCluster:
        if self.priority_class and not self.queue_name:
            raise ValueError(
                "priority_class: Kueue reads it only on a queued job; set queue_name too"
            )
        return self

    @property
    def kueue_labels(self) -> dict[str, str]:
        """The job's Kueue labels: its queue and priority, where the spec names them."""
        return {
            label: value
            for label, value in (
                (KUEUE_QUEUE_LABEL, self.queue_name),
                (KUEUE_PRIORITY_LABEL, self.priority_class),
            )
            if value
        }


def check_sharding(lora: LoraSettings, training: TrainingSettings) -> None:
    """Refuse ``training.sharding: fsdp`` with ``lora.qlora``: bitsandbytes' 4-bit weights are
    not sharded by FSDP here, and QLoRA is the one-GPU way to fit a large base.

    Raises:
        ValueError: both are set.
    """
    if training.sharding == "fsdp" and lora.qlora:
        raise ValueError(
            "training.sharding fsdp cannot shard lora.qlora's 4-bit base: set lora.qlora: false "
            "to shard the base across ranks, or sharding: ddp to train QLoRA on each GPU"
        )
