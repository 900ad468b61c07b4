"""The process group of a training run: one process, or torchrun's DDP ranks.

The recipe takes a :class:`DistContext` and has a single code path; world size 1 is the
single-device case. ``torchrun`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; NCCL is used
on GPUs and gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["DistContext", "close_distributed", "init_distributed"]


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
