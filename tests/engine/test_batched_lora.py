"""Batched multi-LoRA against PEFT's own mixed-adapter forward, on the tiny demo base.

Expected numbers are never hard-coded: they come from PEFT's ``adapter_names`` forward on
the same model and the same batch, the reference the batched path must reproduce. Both
run in float32; they differ only in the order the LoRA matmuls sum (measured up to
1.5e-6 on logits of magnitude ~4), hence ``rtol = atol = 1e-5``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorafleet.engine.batched_lora import (
    GATHER_MAX_WEIGHTS,
    BatchedLora,
    LoraTable,
    fallback_reason,
)
from lorafleet.engine.generation import BASE_ADAPTER, GenerationRequest, Generator

LOGITS_TOL = {"rtol": 1e-5, "atol": 1e-5}


def save_adapter(base: Path, out: Path, seed: int, **lora: object) -> Path:
    """A PEFT LoRA adapter with random A and B (``init_lora_weights=False``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    get_peft_model(model, LoraConfig(init_lora_weights=False, **lora)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(
    tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Ranks 3, 4, 6 and 8 on different modules; ``scaled`` uses rsLoRA and per-module
    rank and alpha patterns, so every way PEFT computes a scaling is in the batch."""
    root = tmp_path_factory.mktemp("batched-lora")
    scaled = save_adapter(
        tiny_base,
        root / "scaled",
        seed=7,
        r=6,
        lora_alpha=24,
        use_rslora=True,
        rank_pattern={"v_proj": 3},
        alpha_pattern={"q_proj": 40},
        target_modules=["q_proj", "v_proj", "up_proj"],
    )
    return {**tiny_adapters, "scaled": scaled}


def peft_model(base: Path, adapters: dict[str, Path]):
    """A fresh ``PeftModel`` holding ``adapters``, in eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    (first, path), *rest = adapters.items()
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    model = PeftModel.from_pretrained(model, path, adapter_name=first).eval()
    for name, more in rest:
        model.load_adapter(more, adapter_name=name)
    return model


def mixed_batch(names: list[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Twelve left-padded rows cycling through ``names`` and the base, unsorted."""
    keys = [[*names, BASE_ADAPTER][i % (len(names) + 1)] for i in range(12)]
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 300, (len(keys), 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::2, :4] = 0  # every other row is shorter
    return {"input_ids": input_ids, "attention_mask": attention_mask}, keys


def routed(keys: list[str]) -> list[str | None]:
    return [None if k == BASE_ADAPTER else k for k in keys]


@pytest.mark.parametrize("kernel", ["grouped", "gather"])
def test_mixed_batch_logits_match_peft(
    tiny_base: Path, adapters: dict[str, Path], kernel: str
) -> None:
    # Given a PEFT model with four adapters of different ranks, targets and scalings
    model = peft_model(tiny_base, adapters)
    batch, keys = mixed_batch(list(adapters))
    with torch.inference_mode():
        expected = model(**batch, adapter_names=keys).logits  # (12, 9, V)
    # When the same batch runs through the stacked adapters
    lora = BatchedLora(kernel)
    lora.sync(model, list(adapters))
    assert lora.fallbacks == {}
    assert set(lora.bank.slots) == set(adapters)
    with torch.inference_mode(), lora.route(routed(keys)):
        got = model(**batch).logits
    # Then every row matches PEFT, and the base rows are the base output bit for bit
    torch.testing.assert_close(got, expected, **LOGITS_TOL)
    base_rows = [i for i, k in enumerate(keys) if k == BASE_ADAPTER]
    assert base_rows
    assert torch.equal(got[base_rows], expected[base_rows])


def test_a_batch_of_one_adapter_takes_plain_matmuls_and_matches_peft(
    tiny_base: Path, adapters: dict[str, Path]
) -> None:
    # Given a batch whose every row uses the same adapter (the evaluator's batches)
    model = peft_model(tiny_base, adapters)
    batch, _ = mixed_batch(list(adapters))
    name = "scaled"  # rsLoRA, alpha_pattern: the scale must come along
    model.set_adapter(name)
    with torch.inference_mode():
        expected = model(**batch).logits  # PEFT's ordinary one-adapter forward
    lora = BatchedLora()
    lora.sync(model, list(adapters))
    # When it runs routed, Then the route is uniform (nothing gathered) and rows match PEFT
    with torch.inference_mode(), lora.route([name] * len(batch["input_ids"])):
        assert lora._route.uniform == lora.bank.slots[name]
        got = model(**batch).logits
    torch.testing.assert_close(got, expected, **LOGITS_TOL)
    # A forced kernel is honoured: no uniform shortcut then
    forced = BatchedLora("gather")
    forced.sync(model, list(adapters))
    with forced.route([name] * 2):
        assert forced._route.uniform is None


def test_ranks_are_zero_padded_per_module(tiny_base: Path, adapters: dict[str, Path]) -> None:
    model = peft_model(tiny_base, adapters)
    lora = BatchedLora()
    lora.sync(model, list(adapters))
    q_proj = lora.bank.tables["base_model.model.model.layers.0.self_attn.q_proj"]
    down_proj = lora.bank.tables["base_model.model.model.layers.0.mlp.down_proj"]
    slot = lora.bank.slots
    # q_proj: ranks 4 (proposal-writer), 8 (job-analyzer), 6 (scaled) padded to 8
    assert q_proj.a.shape == (3, 8, 64)
    assert q_proj.b.shape == (3, 64, 8)
    assert torch.count_nonzero(q_proj.a[slot["proposal-writer"], 4:]) == 0
    assert torch.count_nonzero(q_proj.b[slot["scaled"], :, 6:]) == 0
    # down_proj: only job-analyzer targets it; the other slots are zero with scale 0
    others = [slot["proposal-writer"], slot["scaled"]]
    assert torch.count_nonzero(down_proj.a[others]) == 0
    assert torch.count_nonzero(down_proj.scale[others]) == 0
    # up_proj: only scaled (rank 6) targets it; 6 float32 rounded up to 16 bytes is 8
    up_proj = lora.bank.tables["base_model.model.model.layers.0.mlp.up_proj"]
    assert up_proj.a.shape == (3, 8, 64)
    # rsLoRA with alpha_pattern on q_proj: 40 / sqrt(6)
    assert float(q_proj.scale[slot["scaled"]]) == pytest.approx(40 / 6**0.5)


def test_peft_weights_are_held_once_and_the_reference_is_unchanged(
    tiny_base: Path, adapters: dict[str, Path]
) -> None:
    model = peft_model(tiny_base, adapters)
    batch, keys = mixed_batch(list(adapters))
    with torch.inference_mode():
        before = model(**batch, adapter_names=keys).logits
    lora = BatchedLora()
    lora.sync(model, list(adapters))
    # PEFT's LoRA parameters are now slices of the stack, not copies
    modules = dict(model.named_modules())
    for module_name, table in lora.bank.tables.items():
        layer = modules[module_name]
        for name in layer.lora_A:
            slot = lora.bank.slots[name]
            assert layer.lora_A[name].weight.data_ptr() == table.a[slot].data_ptr()
            assert layer.lora_B[name].weight.data_ptr() == table.b[slot].data_ptr()
    # and PEFT's own path gives exactly what it gave before
    with torch.inference_mode():
        after = model(**batch, adapter_names=keys).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_a_base_only_batch_is_the_base_model(tiny_base: Path, adapters: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    batch, _ = mixed_batch(list(adapters))
    with torch.inference_mode():
        expected = AutoModelForCausalLM.from_pretrained(tiny_base).eval()(**batch).logits
    model = peft_model(tiny_base, adapters)
    lora = BatchedLora()
    lora.sync(model, list(adapters))
    with torch.inference_mode(), lora.route([None] * len(batch["input_ids"])):
        got = model(**batch).logits
    assert torch.equal(got, expected)


def test_resync_builds_a_new_bank_and_keeps_the_old_one_intact(
    tiny_base: Path, adapters: dict[str, Path]
) -> None:
    model = peft_model(tiny_base, adapters)
    lora = BatchedLora()
    lora.sync(model, list(adapters))
    old = lora.bank
    old_slots, old_a = dict(old.slots), {k: t.a.clone() for k, t in old.tables.items()}
    # When an adapter is deleted and the stack rebuilt
    model.delete_adapter("job-analyzer")
    lora.sync(model, ["proposal-writer", "scaled"])
    # Then the new bank holds the rest, and a batch holding the old bank still sees it whole
    assert lora.bank is not old
    assert dict(lora.bank.slots) == {"proposal-writer": 0, "scaled": 1}
    assert "base_model.model.model.layers.0.mlp.down_proj" not in lora.bank.tables
    assert dict(old.slots) == old_slots
    for key, a in old_a.items():
        assert torch.equal(old.tables[key].a, a)


def test_dora_cannot_be_stacked(tiny_base: Path, tmp_path: Path) -> None:
    dora = save_adapter(
        tiny_base, tmp_path / "dora", seed=3, r=4, use_dora=True, target_modules=["q_proj"]
    )
    model = peft_model(tiny_base, {"dora": dora})
    assert "DoraLinearVariant" in fallback_reason(model, "dora")


def test_adapters_the_stack_cannot_hold_run_through_peft(
    tiny_base: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    # Given an adapter with a LoRA bias (PEFT mixes it in batches; the stack cannot hold it)
    biased = save_adapter(
        tiny_base, tmp_path / "biased", seed=5, r=4, lora_bias=True, target_modules=["v_proj"]
    )
    served = {"biased": biased, "proposal-writer": adapters["proposal-writer"]}
    served["scaled"] = adapters["scaled"]
    # When a generator serves it beside stacked adapters, and a reference serves all via PEFT
    fast = Generator(tiny_base, served)
    reference = Generator(tiny_base, served, lora_backend="peft")
    # Then only it falls back; batches with and without it give PEFT's tokens
    assert set(fast.peft_fallbacks) == {"biased"}
    assert "LoRA bias" in fast.peft_fallbacks["biased"]
    assert set(fast.lora_bank.slots) == {"proposal-writer", "scaled"}
    for names in ([None, "proposal-writer", "scaled"], [None, "biased", "scaled", "biased"]):
        requests = [
            GenerationRequest(prompt=f"A client posts job {i}", adapter=n, max_new_tokens=6)
            for i, n in enumerate(names)
        ]
        assert fast.generate(requests) == reference.generate(requests)


def test_cpu_kernel_choice() -> None:
    def table(rank: int, features: int) -> LoraTable:
        return LoraTable(
            torch.zeros(8, rank, features), torch.zeros(8, features, rank), torch.zeros(8)
        )

    # rows * rank * (in + out) weights gathered: 64 * 16 * 512 = GATHER_MAX_WEIGHTS
    assert GATHER_MAX_WEIGHTS == 64 * 16 * 512
    assert table(16, 256).kernel(rows=64) == "gather"
    assert table(16, 256).kernel(rows=65) == "grouped"
    assert table(16, 2048).kernel(rows=64) == "grouped"
    # 30 float32 features are 120 bytes a row: grouped_mm refuses unaligned strides
    assert table(16, 30).kernel(rows=4096) == "gather"
