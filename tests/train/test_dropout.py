"""GeometricDropout is Bernoulli dropout: same drop rate, independent elements, same scaling."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from lorafleet.train.dropout import GeometricDropout, dropped_positions, use_geometric_lora_dropout  # noqa: E402


@pytest.mark.parametrize("p", [0.01, 0.05, 0.3])
def test_dropped_positions_match_a_bernoulli_sample(p: float) -> None:
    """Given many draws over 20,000 elements, the drop rate is p within 5 standard errors,
    neighbours are dropped together at rate p^2 (independence), and positions are sorted,
    unique and in range."""
    n, draws = 20_000, 60
    gen = torch.Generator().manual_seed(1)
    masks = torch.zeros(draws, n)
    for i in range(draws):
        pos = dropped_positions(n, p, generator=gen)
        assert pos.numel() == 0 or (int(pos.min()) >= 0 and int(pos.max()) < n)
        assert torch.all(pos[1:] > pos[:-1])
        masks[i, pos] = 1.0
    total = n * draws
    se = (p * (1 - p) / total) ** 0.5
    assert abs(masks.mean().item() - p) < 5 * se
    both = (masks[:, 1:] * masks[:, :-1]).mean().item()
    assert abs(both - p * p) < 5 * (p * p / (total - draws)) ** 0.5
    # each position is dropped at rate p too: the first and last elements are not special
    assert abs(masks[:, 0].mean().item() - p) < 0.25 and abs(masks[:, -1].mean().item() - p) < 0.25


def test_dropped_positions_cover_inputs_much_smaller_than_one_gap() -> None:
    gen = torch.Generator().manual_seed(0)
    counts = [dropped_positions(3, 0.01, generator=gen).numel() for _ in range(2000)]
    assert 0 < sum(counts) < 200  # about 60 expected; at n=3 the first chunk rarely covers n alone


def test_geometric_dropout_scales_kept_values_and_passes_the_mask_to_gradients() -> None:
    torch.manual_seed(0)
    layer = GeometricDropout(0.2)
    x = torch.ones(400, 50, requires_grad=True)
    y = layer(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.8))
    assert 0.15 < 1 - kept.float().mean().item() < 0.25
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.8)
    layer.eval()
    assert layer(x) is x  # eval: identity
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        GeometricDropout(1.0)


def test_geometric_dropout_is_reproducible_from_the_global_rng_state() -> None:
    """The recipe's resume restores torch's RNG state; the same state must give the same mask."""
    layer = GeometricDropout(0.1)
    x = torch.randn(64, 32)
    state = torch.get_rng_state()
    a = layer(x)
    torch.set_rng_state(state)
    torch.testing.assert_close(layer(x), a)
    assert not torch.equal(layer(x), a)


def test_use_geometric_lora_dropout_swaps_only_lora_dropout(tiny_base: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    )
    layers = model.config.num_hidden_layers
    assert use_geometric_lora_dropout(peft_model) == 2 * layers
    found = [m for m in peft_model.modules() if isinstance(m, GeometricDropout)]
    assert len(found) == 2 * layers and all(m.p == 0.1 for m in found)
    assert not any(
        type(m) is torch.nn.Dropout for m in peft_model.modules() if getattr(m, "p", 0) == 0.1
    )
    none = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base), LoraConfig(r=4, lora_dropout=0.0)
    )
    assert use_geometric_lora_dropout(none) == 0  # dropout 0 is nn.Identity: left alone
