"""The FLOP count behind the training benchmark's MFU equals what torch's FLOP counter sees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lorafleet.chat import IGNORE_INDEX  # noqa: E402
from lorafleet.fleet import LoraSettings, TrainingSettings  # noqa: E402
from lorafleet.records import Record  # noqa: E402
from lorafleet.train.flops import linear_costs, training_flops  # noqa: E402
from lorafleet.train.recipe import LoRARecipe, _lora_config  # noqa: E402

MATMULS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm}


def _records(n: int = 6) -> list[Record]:
    return [
        Record(
            id=f"r{i}",
            task="chat",
            source="human",
            messages=[
                {
                    "role": "user",
                    "content": f"Summarize job post {i}: " + "design a logo " * (i + 1),
                },
                {"role": "assistant", "content": f"A logo design job, {i + 2} days, fixed price."},
            ],
        )
        for i in range(n)
    ]


def _matmul_flops(counter: FlopCounterMode) -> int:
    counts = counter.get_flop_counts()["Global"]
    return sum(
        v
        for op, v in counts.items()
        if op in MATMULS or getattr(op, "overloadpacket", None) in MATMULS
    )


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_a_recipe_step_costs_the_counted_linear_and_head_flops(
    tiny_base: Path, tmp_path: Path, targets
) -> None:
    """Given a packed recipe micro-batch (LM head at label positions only), the matmul
    FLOPs torch counts in its forward and backward equal linear + head of the count
    (attention runs in SDPA calls, which the counter does not see on CPU)."""
    recipe = LoRARecipe(
        tiny_base,
        _records(),
        LoraSettings(r=4, alpha=8, dropout=0.1, target_modules=targets),
        TrainingSettings(batch_size=2, max_seq_len=64),
        tmp_path / "adapter",
    )
    recipe.setup()
    try:
        rows = next(recipe._micro_batches(0, 0))[2]
        examples = [e for row in rows for e in row]
        labels = sum(e.n_label_tokens for e in examples)
        costs = linear_costs(recipe.model)
        with FlopCounterMode(display=False) as counter:
            recipe._forward_backward(rows, labels)
        # the recipe computes logits where the next token is a label, never across examples
        positions = sum(1 for e in examples for t in e.labels[1:] if t != IGNORE_INDEX)
        want = training_flops(costs, [len(e.input_ids) for e in examples], positions)
        assert _matmul_flops(counter) == want.linear + want.head
        assert want.attention > 0
    finally:
        recipe.cleanup()


def test_eager_attention_costs_the_counted_attention_flops(tiny_base: Path) -> None:
    """Given eager attention (plain batched matmuls over the full square) and a plain
    full-logits loss, everything torch counts equals the count with ``causal=False``, and
    the causal count is that minus half the attention."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation="eager")
    model = get_peft_model(model, _lora_config(LoraSettings(r=8, alpha=16, dropout=0.0)))
    model.train()
    costs = linear_costs(model)
    n = 37
    ids = torch.randint(3, 200, (1, n))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    full = training_flops(costs, [n], n, causal=False)
    assert counter.get_total_flops() == full.total
    causal = training_flops(costs, [n], n)
    assert causal.attention == full.attention / 2 and causal.linear == full.linear


def test_linear_costs_leaves_the_rng_where_it_was(tiny_base: Path) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base), _lora_config(LoraSettings(dropout=0.2))
    )
    model.train()
    state = torch.get_rng_state()
    linear_costs(model)
    assert torch.equal(torch.get_rng_state(), state)


def test_training_reports_mfu_against_the_peak_it_is_given(
    tiny_base: Path, tmp_path: Path, monkeypatch
) -> None:
    """With ``$LORAFLEET_PEAK_TFLOPS`` set (a CPU has no known peak), every step and the
    result carry MFU = model TFLOP/s over that peak."""
    from lorafleet.train.recipe import train_adapter

    monkeypatch.setenv("LORAFLEET_PEAK_TFLOPS", "0.5")
    result = train_adapter(
        tiny_base,
        _records(),
        LoraSettings(r=4, alpha=8, dropout=0.0),
        TrainingSettings(max_steps=3, batch_size=2, max_seq_len=64),
        tmp_path / "adapter",
    )
    lines = [
        json.loads(x) for x in (tmp_path / "adapter" / "metrics.jsonl").read_text().splitlines()
    ]
    for m in lines:
        assert m["mfu"] == pytest.approx(m["tflops_per_s"] / 0.5, rel=1e-2, abs=1e-4)
    assert result.mfu == pytest.approx(result.tflops_per_s / 0.5, rel=1e-2, abs=1e-4)
    assert result.mfu > 0


@pytest.mark.parametrize("value", ["zero", "0", "-3"])
def test_a_bad_peak_in_the_environment_is_named(value: str, monkeypatch) -> None:
    from lorafleet.train.flops import device_peak_tflops

    monkeypatch.setenv("LORAFLEET_PEAK_TFLOPS", value)
    with pytest.raises(ValueError, match=r"LORAFLEET_PEAK_TFLOPS=.*positive number"):
        device_peak_tflops("cpu")
    monkeypatch.delenv("LORAFLEET_PEAK_TFLOPS")
    assert device_peak_tflops("cpu") is None
