"""Resumable training checkpoints, written atomically.

A checkpoint is one directory ``<run_dir>/checkpoints/step-NNNNNNNN/`` holding the
trainable (adapter) weights, the optimizer and scheduler states, every RNG state and
``state.json`` (step, data position, metrics so far, and the identity of the run: base
fingerprint, LoRA settings, data plan). It is built in a temporary directory and renamed
into place, so a process killed at any moment leaves only whole checkpoints behind.

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

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint"]

_PREFIX = "step-"


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
    run_dir: str | Path, step: int, model, optimizer, scheduler, state: dict[str, Any], keep: int
) -> Path:
    """Write a checkpoint for ``step`` and drop all but the ``keep`` newest.

    Args:
        run_dir: the run directory.
        step: optimizer steps done.
        model: the PEFT model; only its adapter weights are saved.
        optimizer: its ``state_dict()`` is saved.
        scheduler: its ``state_dict()`` is saved.
        state: JSON-serializable run state (data position, metrics, identity).
        keep: how many checkpoints to keep.

    Returns:
        The checkpoint directory.
    """
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    path = run_dir / "checkpoints" / f"{_PREFIX}{step:08d}"
    with atomic_dir(path) as tmp:
        weights = {
            k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()
        }
        save_file(weights, tmp / "adapter_model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
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

    Args:
        path: a checkpoint directory.
        model: the PEFT model to load the adapter weights into.
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
