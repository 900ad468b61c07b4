"""Resumable training checkpoints, written atomically.

A checkpoint is one directory ``<run_dir>/checkpoints/step-NNNNNNNN/`` holding the
trainable (adapter) weights, the optimizer and scheduler states, every RNG state and
``state.json`` (step, data position, metrics so far, and the identity of the run: base
fingerprint, LoRA settings, data plan). It is built in a temporary directory and renamed
into place, so a process killed at any moment leaves only whole checkpoints behind.

Under FSDP (``training.sharding: fsdp``) the adapter weights and optimizer state are sharded
across the ranks: every rank joins the gathers that make them whole (small: only the
trainable LoRA tensors, never the frozen base), rank 0 writes the very same files, and
resume splits them back into each rank's shards. The files are those one unsharded process
writes (optimizer state numbered by parameter, as ``optimizer.state_dict()`` numbers it).

Nothing is unpickled on resume (checkpoints may sit on a shared volume others can write):
weights and RNG tensors are safetensors, Python's and numpy's RNG states plain JSON, and the
optimizer and scheduler states load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

from lorafleet.io import atomic_dir, atomic_write_json
from lorafleet.train.errors import ResumeMismatchError

__all__ = [
    "adapter_weights",
    "gather_trainable",
    "is_sharded",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

_PREFIX = "step-"


def is_sharded(model) -> bool:
    """Whether ``model`` was sharded with FSDP2 (:func:`lorafleet.train.distributed.shard_model`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _full_options():
    """Whole tensors on rank 0's CPU (the others get none), frozen base weights left out."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def gather_trainable(model, main: bool = True) -> dict[str, Any]:
    """An FSDP-sharded model's trainable parameters (the adapter), whole, on the CPU, keyed by
    their names in ``model``: a collective (every rank calls it) that gathers only them, never
    the frozen base; ``main`` (rank 0) gets them, the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_full_options())
    return full if main else {}


def adapter_weights(model, main: bool = True) -> dict[str, Any]:
    """The adapter's weights as PEFT saves them: model-relative names without the adapter
    name (``...q_proj.lora_A.weight``), whole tensors on the CPU.

    Under FSDP this gathers the shards, a collective: every rank must call it, and only
    rank 0 gets the weights (``main`` False: an empty dict, nothing is renamed).
    """
    from peft import get_peft_model_state_dict

    if not is_sharded(model):
        return {
            k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()
        }
    full = gather_trainable(model, main)
    if not main:
        return {}
    return {k: v.contiguous() for k, v in get_peft_model_state_dict(model, state_dict=full).items()}


def _adapter_names(model) -> dict[str, str]:
    """PEFT's saved name of each trainable parameter -> its name in ``model``."""
    from peft import get_peft_model_state_dict

    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    by_id = {id(p): n for n, p in named.items()}
    # PEFT renames (drops the adapter name) but keeps the values: the objects map names back.
    return {k: by_id[id(v)] for k, v in get_peft_model_state_dict(model, state_dict=named).items()}


def _optimizer_by_index(model, optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` as one process would write it (parameters numbered in
    order), with whole tensors; under FSDP a collective, an empty dict on ranks other than 0."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not by_name:
        return {}
    index: dict[str, int] = {}
    groups = [
        {**g, "params": [index.setdefault(name, len(index)) for name in g["params"]]}
        for g in by_name["param_groups"]
    ]
    return {"state": {index[n]: s for n, s in by_name["state"].items()}, "param_groups": groups}


def _optimizer_by_name(model, optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A saved ``optimizer.state_dict()`` keyed by parameter names instead of numbers."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {
        "state": {order[i]: s for i, s in state["state"].items()},
        "param_groups": [
            {**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]
        ],
    }


def _checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / "state.json").is_file()
    )


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``run_dir``, or ``None``."""
    found = _checkpoints(Path(run_dir))
    return found[-1] if found else None


def _save_rng_state(folder: Path) -> None:
    """Every RNG's state: torch's (CPU and each CUDA device) as tensors in
    ``rng.safetensors``, Python's and numpy's as numbers in ``rng.json``."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, folder / "rng.safetensors")
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    atomic_write_json(
        folder / "rng.json",
        {
            "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
            "numpy": {
                "kind": kind,
                "keys": [int(k) for k in keys],
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached_gaussian),
            },
        },
    )


def _load_rng_state(folder: Path) -> None:
    import numpy as np
    import torch
    from safetensors.torch import load_file

    if not (folder / "rng.json").is_file():
        raise ResumeMismatchError(
            f"{folder}: no rng.json (a checkpoint of an older lorafleet, whose pickled RNG "
            "state is not loaded); resume refused (start a new run directory)"
        )
    tensors = load_file(folder / "rng.safetensors")
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    numbers = json.loads((folder / "rng.json").read_text())
    py = numbers["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    state = numbers["numpy"]
    np.random.set_state(
        (
            state["kind"],
            np.asarray(state["keys"], dtype=np.uint32),
            state["pos"],
            state["has_gauss"],
            state["cached_gaussian"],
        )
    )


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model,
    optimizer,
    scheduler,
    state: dict[str, Any],
    keep: int,
    main: bool = True,
) -> Path:
    """Write a checkpoint for ``step`` and drop all but the ``keep`` newest.

    A sharded (FSDP) model's weights and optimizer state are gathered first: then every
    rank calls this, and only the one with ``main`` writes.

    Args:
        run_dir: the run directory.
        step: optimizer steps done.
        model: the PEFT model (FSDP-sharded or not); only its adapter weights are saved.
        optimizer: its ``state_dict()`` is saved (whole tensors, parameters numbered).
        scheduler: its ``state_dict()`` is saved.
        state: JSON-serializable run state (data position, metrics, identity).
        keep: how many checkpoints to keep.
        main: this process writes (rank 0); the others only join the gathers.

    Returns:
        The checkpoint directory.
    """
    import torch
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    path = run_dir / "checkpoints" / f"{_PREFIX}{step:08d}"
    weights = adapter_weights(model, main)
    optimizer_state = _optimizer_by_index(model, optimizer)
    if not main:
        return path
    with atomic_dir(path) as tmp:
        save_file(weights, tmp / "adapter_model.safetensors")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        _save_rng_state(tmp)
        atomic_write_json(tmp / "state.json", {**state, "step": step})
    for old in _checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(
    path: str | Path, model, optimizer, scheduler, identity: dict[str, Any]
) -> dict[str, Any]:
    """Restore a checkpoint into ``model``, ``optimizer``, ``scheduler`` and the RNGs.

    Every rank calls it; a sharded (FSDP) model and its optimizer get their shards of the
    whole tensors saved.

    Args:
        path: a checkpoint directory.
        model: the PEFT model (FSDP-sharded or not) to load the adapter weights into.
        optimizer: restored in place.
        scheduler: restored in place.
        identity: what this run is (base fingerprint, LoRA settings, data plan); every key
            must equal the checkpoint's.

    Returns:
        The checkpoint's ``state.json``.

    Raises:
        ResumeMismatchError: if the checkpoint belongs to another run.
    """
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    saved = state.get("identity", {})
    for key, value in identity.items():
        if saved.get(key) != value:
            raise ResumeMismatchError(
                f"{path}: {key}: checkpoint has {saved.get(key)!r}, this run has {value!r}; "
                "resume refused (start a new run directory)"
            )
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        names = _adapter_names(model)
        weights = load_file(path / "adapter_model.safetensors")
        if unknown := sorted(weights.keys() - names.keys()):
            raise ResumeMismatchError(
                f"{path}: adapter weight {unknown[0]} is not in this model; resume refused "
                "(start a new run directory)"
            )
        whole = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, {names[k]: v for k, v in weights.items()}, options=whole)
        saved_optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        set_optimizer_state_dict(
            model,
            optimizer,
            _optimizer_by_name(model, optimizer, saved_optimizer),
            options=StateDictOptions(full_state_dict=True),
        )
    else:
        device = next(model.parameters()).device
        set_peft_model_state_dict(
            model, load_file(path / "adapter_model.safetensors", device=str(device))
        )
        optimizer.load_state_dict(
            torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
        )
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _load_rng_state(path)
    return state
