"""Shared fixtures: a tiny demo base model and LoRA adapters on it, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.base import DemoBaseConfig, build_demo_base

# Builds in about a second. 30 pre-training steps lift greedy output above one repeated token.
TINY_BASE = DemoBaseConfig(
    vocab_size=300,
    hidden_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=128,
    pretrain_steps=30,
    pretrain_seq_len=32,
)

CORPUS = [
    "A client posts a job for a data engineer who knows Python and SQL.",
    "The freelancer writes a short proposal that answers every question in the post.",
    "A good profile lists recent work, rates and the hours the freelancer can give.",
    "The job analyzer reads the post and names the skills, the budget and the deadline.",
    "Candidates are compared on skills, reviews and how well they read the brief.",
] * 8

# name -> (rank, target modules): different ranks and modules, so a mixed batch mixes shapes.
TINY_ADAPTERS = {
    "proposal-writer": (4, ["q_proj", "v_proj"]),
    "job-analyzer": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama model directory with a ChatML tokenizer."""
    return build_demo_base(CORPUS, TINY_BASE, cache_dir=tmp_path_factory.mktemp("lorafleet-cache"))


@pytest.fixture(scope="session")
def tiny_adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two PEFT LoRA adapters on ``tiny_base`` with random, non-zero B weights.

    ``init_lora_weights=False`` keeps PEFT from zeroing B, and ``lora_alpha = 8 x rank``
    (4x the usual) makes the random update strong, so each adapter visibly changes the output.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    adapters = {}
    for seed, (name, (rank, targets)) in enumerate(TINY_ADAPTERS.items()):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_base)
        config = LoraConfig(
            r=rank, lora_alpha=8 * rank, target_modules=targets, init_lora_weights=False
        )
        get_peft_model(model, config).save_pretrained(root / name)
        adapters[name] = root / name
    return adapters
