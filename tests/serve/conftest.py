"""Serving fixtures: eight cheap adapters, and a helper to derive broken ones from a good one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lorafleet.base import fingerprint_model
from lorafleet.io import sha256_file

FLEET_SIZE = 8
# The files whose digests the registry records in a registered adapter's lineage.json.
DIGESTED = ("adapter_config.json", "adapter_model.safetensors")


def make_adapter(
    base: Path,
    out: Path,
    seed: int,
    rank: int = 4,
    init_random: bool = True,
    registered: bool = False,
) -> Path:
    """Save a PEFT LoRA adapter on ``base`` without training.

    ``init_lora_weights=False`` draws B at random too (PEFT zeroes it by default), and
    ``lora_alpha = 8 x rank`` makes the update strong enough to change greedy output.
    ``registered=True`` adds the ``lineage.json`` a registered adapter carries: the base's
    fingerprint and the SHA-256 of each of its files (``files``).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=rank,
        lora_alpha=8 * rank,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=not init_random,
    )
    get_peft_model(model, config).save_pretrained(out)
    if registered:
        lineage = {
            "base": {"fingerprint": fingerprint_model(base)},
            "files": {name: sha256_file(out / name) for name in DIGESTED},
        }
        (out / "lineage.json").write_text(json.dumps(lineage, indent=2))
    return out


@pytest.fixture(scope="session")
def fleet_adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Eight random adapters on the tiny base: ``expert-0`` ... ``expert-7``."""
    root = tmp_path_factory.mktemp("fleet")
    return {
        f"expert-{i}": make_adapter(tiny_base, root / f"expert-{i}", seed=100 + i)
        for i in range(FLEET_SIZE)
    }


@pytest.fixture
def copy_adapter(tmp_path: Path):
    """Copy an adapter directory into the test's temp dir, to break it there."""

    def copy(src: Path, name: str = "broken") -> Path:
        return Path(shutil.copytree(src, tmp_path / name))

    return copy
