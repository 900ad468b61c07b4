"""The process group of a training run: one process, or torchrun's DDP or FSDP ranks.

The recipe takes a :class:`DistContext` and has a single code path; world size 1 is the
single-device case. ``torchrun`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; NCCL is used
on GPUs and gloo on CPU (FSDP included: :func:`shard_model` works with either).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = [
    "DistContext",
    "broadcast_rng_state",
    "close_distributed",
    "init_distributed",
    "shard_model",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the run.

    Attributes:
        rank: global rank, 0 writes files.
        world_size: number of processes.
        device: ``"cuda:N"`` or ``"cpu"``.
        owns_group: this process created the process group (and so destroys it).
    """

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistContext:
    """Join torchrun's process group when launched by it; otherwise a single process."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    if world == 1:
        return DistContext(device=device)
    import torch.distributed as dist

    owns = not dist.is_initialized()
    if owns:
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), device=device, owns_group=owns
    )


def close_distributed(ctx: DistContext) -> None:
    """Leave the process group that :func:`init_distributed` created.

    No barrier: after a failure on one rank the others may be inside a collective, and a
    barrier would hang them; torchrun ends the other ranks when one exits with an error.
    """
    if not ctx.owns_group:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_rng_state(ctx: DistContext) -> None:
    """Give every rank rank 0's CPU random generator state (a collective)."""
    import torch
    import torch.distributed as dist

    state = [torch.get_rng_state() if ctx.is_main else None]
    dist.broadcast_object_list(state, src=0)
    torch.set_rng_state(state[0])


def shard_model(model, ctx: DistContext):
    """Shard ``model`` over every rank with FSDP2 (``fully_shard``), in place, with rank 0's
    weights.

    Each decoder layer (the classes transformers lists in the base's ``_no_split_modules``)
    becomes one FSDP unit, gathered just before it runs and freed after; the root unit holds
    the rest (embeddings, final norm, LM head). Frozen base weights are sharded like the
    adapter's; only parameters that need gradients get them reduce-scattered, and FSDP
    averages those over the ranks as DDP does. Parameters become ``DTensor``s sharded on
    dim 0, so the optimizer must be built after this call.

    Only rank 0 needs the weights: the other ranks' model may be on the ``meta`` device
    (built from the config, no storage). Once sharded, those ranks allocate their shards
    and every rank's shards are filled from rank 0's whole tensors, broadcast one at a
    time, base and adapter alike (so every rank has rank 0's adapter init), and so are the
    buffers, non-persistent ones too (the rotary embedding's ``inv_freq``, which no state
    dict holds). A rank other than 0 thus never holds more than its shards and one whole
    tensor in flight.

    Args:
        model: the PEFT model; on rank 0 with its weights, on the CPU or ``ctx.device``;
            elsewhere the same model on the ``meta`` device (or with weights, overwritten).
        ctx: this rank's place in the run (a CUDA device uses NCCL, the CPU gloo).

    Returns:
        ``model`` itself (its class is swapped for an FSDP subclass).
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # References to rank 0's whole tensors: fully_shard copies its shard out of each.
    whole = model.state_dict() if ctx.is_main else {}
    mesh = init_device_mesh(torch.device(ctx.device).type, (ctx.world_size,))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model.to_empty(device=ctx.device)  # storage for this rank's shards (and the buffers)
    set_model_state_dict(
        model,
        whole,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
    del whole
    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    return model
