"""Where a model runs and in which dtype: CUDA when visible, bf16 where the GPU supports it.

Training, evaluation and serving all load the base through these three functions, so a
step that holds a GPU uses it, and a step that was given GPUs but sees none stops with one
line instead of running for hours in fp32 on the CPU. The compiled pipeline tells each step
how many GPUs its profile gave it in :data:`GPUS_ENV` (``pipelines/platform.py``). torch is
imported only when a function runs: the pipeline compiler imports this module for the name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from lorafleet.errors import LorafleetError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPES",
    "GPUS_ENV",
    "GpuNotVisibleError",
    "pick_device",
    "pick_dtype",
    "require_gpus",
]

# How many GPUs the step's pod was given (its profile's accelerator_count); unset: none asked.
GPUS_ENV = "LORAFLEET_GPUS"

# The spec's ``base.dtype`` values (lorafleet.fleet.BaseSpec) besides "auto": torch dtype names.
DTYPES = ("float32", "bfloat16", "float16")


class GpuNotVisibleError(LorafleetError):
    """The step was given GPUs (``LORAFLEET_GPUS``) but torch sees no CUDA device."""


def require_gpus(environ: Mapping[str, str] | None = None) -> int:
    """Fail when the step was given GPUs that torch cannot see.

    Args:
        environ: the environment to read (default ``os.environ``).

    Returns:
        The number of GPUs the step was given (0 when ``LORAFLEET_GPUS`` is unset).

    Raises:
        GpuNotVisibleError: ``LORAFLEET_GPUS`` is above 0 and ``torch.cuda.device_count()``
            is 0 (a CPU-only torch in the image, or no GPU mounted into the container).
        LorafleetError: ``LORAFLEET_GPUS`` is not a whole number.
    """
    import torch

    raw = (os.environ if environ is None else environ).get(GPUS_ENV, "").strip()
    if not raw:
        return 0
    try:
        given = int(raw)
    except ValueError:
        raise LorafleetError(f"{GPUS_ENV}={raw!r}: not a whole number of GPUs") from None
    if given > 0 and torch.cuda.device_count() == 0:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise GpuNotVisibleError(
            f"this step was given {given} GPU(s) ({GPUS_ENV}={given}) but torch "
            f"{torch.__version__} ({build}) sees none; use the CUDA image "
            "(make image-gpu, docs/gpu.md) on a node with GPUs, or drop the step's accelerator"
        )
    return given


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else the first CUDA device when one is visible, else the CPU.

    Checks :func:`require_gpus` first, so a step given GPUs never falls back to the CPU.
    """
    import torch

    require_gpus()
    if device is not None:
        return torch.device(device)
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """The weight dtype for ``device``.

    Args:
        dtype: a torch dtype, one of :data:`DTYPES`' names, or ``"auto"``/``None``: bf16 on
            a CUDA device that supports it (``torch.cuda.is_bf16_supported()``), else
            float32 (fp16 weights without loss scaling are not safe to train).
        device: where the model will run.

    Returns:
        The dtype to load the weights in.

    Raises:
        LorafleetError: an unknown dtype name.
    """
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        cuda = torch.device(device).type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise LorafleetError(f"base.dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return getattr(torch, dtype)
