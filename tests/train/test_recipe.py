"""The LoRA recipe lowers the loss and writes a loadable adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafleet.fleet import LoraSettings, TrainingSettings
from lorafleet.records import Record
from lorafleet.train.recipe import LoRARecipe, train_adapter


def _records(n: int = 12) -> list[Record]:
    return [
        Record(
            id=f"r{i}",
            task="chat",
            source="human",
            messages=[
                {"role": "user", "content": f"What is the budget of job {i}?"},
                {"role": "assistant", "content": f"The budget of job {i} is {100 * i} dollars."},
            ],
        )
        for i in range(n)
    ]


def test_training_lowers_the_loss_and_saves_an_adapter(tiny_base: Path, tmp_path: Path) -> None:
    result = train_adapter(
        tiny_base,
        _records(),
        LoraSettings(r=8, alpha=16, dropout=0.0, target_modules="all-linear"),
        TrainingSettings(epochs=20, learning_rate=1e-2, batch_size=4, warmup_ratio=0.0),
        tmp_path / "adapter",
    )
    assert result.steps == 60  # ceil(12 / 4) x 20 epochs
    assert len(result.losses) == result.steps
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.8 * first, result.losses  # seen: about 0.70 with this seed
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8
    lines = (tmp_path / "adapter" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == result.steps and json.loads(lines[0])["step"] == 1


def test_the_recipe_checks_its_inputs(tiny_base: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no training records"):
        LoRARecipe(tiny_base, [], LoraSettings(), TrainingSettings(), tmp_path)
    no_answers = [
        Record(id="a", task="chat", source="human", messages=[{"role": "user", "content": "hi"}])
    ]
    with pytest.raises(ValueError, match="no assistant turns"):
        LoRARecipe(tiny_base, no_answers, LoraSettings(), TrainingSettings(), tmp_path)


def test_the_label_only_loss_equals_the_full_logits_loss(tiny_base: Path, tmp_path: Path) -> None:
    """Given a micro-batch of packed rows, the recipe's loss (one padding-free sequence,
    varlen attention, LM head and cross-entropy at assistant positions only) and its
    gradients equal transformers' own loss on the same examples as an ordinary right-padded
    batch through SDPA with logits at every position.

    Expected numbers come from that reference, computed here; the tolerances only admit
    float32 rounding (different matmul shapes sum in a different order).
    """
    import torch

    from lorafleet.batches import collate
    from lorafleet.chat import IGNORE_INDEX

    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    training = TrainingSettings(packing=True, batch_size=2, max_seq_len=256, seed=0)
    recipe = LoRARecipe(tiny_base, _records(), lora, training, tmp_path / "out")
    recipe.setup()
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero in PEFT: make it non-zero so that A gets gradients too
        for name, p in recipe.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    _, _, rows = next(recipe._micro_batches(0, 0))
    examples = [e for r in rows for e in r]
    assert sum(len(r) for r in rows) > len(rows)  # rows really are packed
    n_labels = sum(e.n_label_tokens - (e.labels[0] != IGNORE_INDEX) for e in examples)

    loss, tokens = recipe._forward_backward(rows, n_labels)
    got = {n: p.grad.clone() for n, p in recipe.model.named_parameters() if p.requires_grad}
    recipe.model.zero_grad(set_to_none=True)

    recipe.model.base_model.model.set_attn_implementation("sdpa")
    padded = collate(examples, recipe.tokenizer.pad_token_id)
    reference = recipe.model(**padded, num_items_in_batch=n_labels, use_cache=False).loss
    reference.backward()
    want = {n: p.grad for n, p in recipe.model.named_parameters() if p.requires_grad}

    assert tokens == sum(len(e.input_ids) for e in examples)
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-6, atol=1e-6)
    assert (
        got.keys() == want.keys() and len(want) == 2 * 7 * 2
    )  # 2 layers x 7 linear modules x A, B
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_every_step_logs_loss_lr_and_throughput_to_the_run_dir_and_kfp(
    tiny_base: Path, tmp_path: Path
) -> None:
    """Given a 10-step run with 20% warmup, then ``<run_dir>/metrics.jsonl`` has one line
    per step with its loss, learning rate and tokens/s; the learning rates follow linear
    warmup then cosine decay; and the train component's KFP Metrics artifact gets the summary.

    Expected learning rates: lr x factor, with factor (s + 1) / (warmup + 1) for the
    warmup steps s < 2, then 0.5 x (1 + cos(pi x (s - 2) / 8)).
    """
    import math

    from kfp.dsl import Metrics

    from lorafleet.components.runtime import log_metrics
    from lorafleet.report import kfp_train_metrics

    training = TrainingSettings(
        max_steps=10, learning_rate=1e-2, batch_size=4, warmup_ratio=0.2, packing=True
    )
    result = train_adapter(
        tiny_base,
        _records(),
        LoraSettings(r=4, alpha=8, dropout=0.0),
        training,
        tmp_path / "adapter",
        run_dir=tmp_path / "run",
    )
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 11))
    assert all(
        m["loss"] > 0 and m["tokens"] > 0 and m["tokens_per_s"] > 0 and m["label_tokens"] > 0
        for m in lines
    )
    # Model FLOPs of each step (lorafleet.train.flops): no MFU on a CPU, whose peak is unknown.
    assert all(m["tflops"] > 0 and m["tflops_per_s"] > 0 and "mfu" not in m for m in lines)
    walls = sum(m["tokens"] / m["tokens_per_s"] for m in lines)
    assert result.tflops_per_s == pytest.approx(sum(m["tflops"] for m in lines) / walls, rel=1e-3)
    assert result.mfu is None
    factors = [1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert [m["lr"] for m in lines] == pytest.approx([1e-2 * f for f in factors], rel=1e-12)
    assert [m["loss"] for m in lines] == result.losses

    metrics = Metrics(name="metrics", uri=str(tmp_path / "kfp-metrics"), metadata={})
    log_metrics(metrics, kfp_train_metrics(result.to_dict()))
    assert metrics.metadata == {
        "final_loss": round(result.losses[-1], 5),
        "steps": 10,
        "tokens_per_s": result.tokens_per_s,
        "model_tflops_per_s": result.tflops_per_s,
    }


def _step_grads(recipe: LoRARecipe) -> tuple[float, dict]:
    """Loss and LoRA gradients of the recipe's first micro-batch, from a fixed RNG state."""
    import torch

    _, _, rows = next(recipe._micro_batches(0, 0))
    n_labels = sum(e.n_label_tokens for r in rows for e in r)
    recipe.model.train()  # as train() does: dropout and checkpointing act in training mode only
    assert recipe.model.is_activation_checkpointing == recipe.training.gradient_checkpointing
    torch.manual_seed(7)  # the same dropout masks on both sides
    loss, _ = recipe._forward_backward(rows, n_labels)
    return float(loss), {
        n: p.grad.clone() for n, p in recipe.model.named_parameters() if p.requires_grad
    }


def test_gradient_checkpointing_recomputes_the_same_loss_and_gradients(
    tiny_base: Path, tmp_path: Path
) -> None:
    """Given the same weights, data and RNG state, a step with gradient checkpointing gives
    the loss and LoRA gradients of a step without it (recomputation changes memory, not math;
    with LoRA dropout on, the recomputed forward must reuse the first forward's masks)."""
    import torch

    lora = LoraSettings(r=4, alpha=8, dropout=0.1, target_modules="all-linear")
    sides = []
    for checkpointing in (False, True):
        training = TrainingSettings(
            batch_size=2, max_seq_len=256, gradient_checkpointing=checkpointing
        )
        recipe = LoRARecipe(
            tiny_base, _records(), lora, training, tmp_path / f"out-{checkpointing}"
        )
        recipe.setup()
        torch.manual_seed(1)
        with torch.no_grad():  # non-zero B, so that A gets gradients too
            for name, p in recipe.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        sides.append(_step_grads(recipe))
        recipe.cleanup()
    (loss_a, grads_a), (loss_b, grads_b) = sides
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"use_rslora": True}])
def test_dora_and_rslora_train_and_save_their_settings(
    tiny_base: Path, tmp_path: Path, variant: dict
) -> None:
    """DoRA and rsLoRA run through the recipe (with LoRA dropout), lower the loss, and the
    saved adapter says which variant it is."""
    lora = LoraSettings(r=8, alpha=16, dropout=0.05, target_modules="all-linear", **variant)
    result = train_adapter(
        tiny_base,
        _records(),
        lora,
        TrainingSettings(epochs=15, learning_rate=3e-3, batch_size=4, warmup_ratio=0.0),
        tmp_path / "adapter",
    )
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.9 * first, result.losses  # seen: 0.81 (DoRA), 0.76 (rsLoRA)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {k: config[k] for k in variant} == variant
