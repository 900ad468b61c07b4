"""Packed sequences give the same logits as each example run alone: no attention across examples."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from lorafleet.chat import IGNORE_INDEX, TokenizedExample
from lorafleet.train.attention import VARLEN, register_varlen_attention
from lorafleet.train.packing import collate_packed, pack_rows


def test_pack_rows_fills_rows_first_fit_and_keeps_every_example() -> None:
    lengths = [5, 3, 8, 2, 7, 1]
    rows = pack_rows(lengths, max_len=10, rng=random.Random(0))
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 3  # 26 tokens need at least 3 rows of 10; first-fit reaches that here
    assert pack_rows(lengths, 10, random.Random(0)) == rows  # same seed, same rows
    assert sorted(pack_rows(lengths, 10, random.Random(0), packing=False)) == [
        [i] for i in range(6)
    ]


def test_collate_packed_lays_examples_end_to_end_with_their_boundaries() -> None:
    a = TokenizedExample(input_ids=[1, 2, 3], labels=[IGNORE_INDEX, 2, 3])
    b = TokenizedExample(input_ids=[4, 5], labels=[4, 5])
    batch = collate_packed([[a, b], [b]])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 4, 5]]  # no padding anywhere
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5, 7]
    assert batch["max_length"] == 3
    # Logits are kept where the next token is a label: position p predicts token p + 1. Position 2
    # is not kept: b's first label is dropped, so 3 is never trained to predict 4 across the boundary.
    assert batch["logit_index"].tolist() == [0, 1, 3, 5]
    assert batch["targets"].tolist() == [2, 3, 5, 5]
    assert batch["n_tokens"] == 7


@pytest.mark.parametrize("attention", [VARLEN, "sdpa"])
def test_a_packed_sequence_gives_each_example_its_own_logits(
    tiny_base: Path, attention: str
) -> None:
    """Given three examples packed into one sequence, when the model runs once on it,
    then each example's slice of logits equals the logits of that example run alone.

    ``lorafleet_varlen`` is the recipe's attention on CPU (boundaries from ``cu_seq_lens``);
    ``sdpa`` is transformers' own path (boundaries found where position ids restart).
    """
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    register_varlen_attention()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation=attention).eval()
    alone_model = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation="sdpa").eval()
    lengths = [7, 12, 5]
    examples = [
        TokenizedExample(input_ids=torch.randint(3, 300, (n,)).tolist(), labels=[IGNORE_INDEX] * n)
        for n in lengths
    ]
    batch = collate_packed([examples[:2], examples[2:]])
    with torch.no_grad():
        # use_cache=False: transformers only looks for packed positions when no KV cache is built.
        packed = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            use_cache=False,
            cu_seq_lens_q=batch["cu_seq_lens"],
            cu_seq_lens_k=batch["cu_seq_lens"],
            max_length_q=batch["max_length"],
            max_length_k=batch["max_length"],
        ).logits[0]
        start = 0
        for e in examples:
            alone = alone_model(input_ids=torch.tensor([e.input_ids])).logits[0]
            torch.testing.assert_close(
                packed[start : start + len(e.input_ids)], alone, rtol=1e-5, atol=1e-5
            )
            start += len(e.input_ids)
        # As one plain sequence (one boundary-free example) the later examples see the earlier ones.
        whole = alone_model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    assert not torch.allclose(whole[lengths[0] :], packed[lengths[0] :], atol=1e-3)


@pytest.mark.parametrize("rows", [1, 3])
def test_varlen_attention_equals_causal_attention_run_per_example(rows: int) -> None:
    """Given grouped-query q/k/v of ``rows`` rows and example boundaries across them, when
    varlen attention runs, then each example's output (and its gradients) equals causal SDPA
    on that example alone; with no boundaries each row is one example."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from lorafleet.train.attention import varlen_attention

    torch.manual_seed(0)
    t, d = 10, 8
    q = torch.randn(rows, 4, t, d, requires_grad=True)
    k = torch.randn(rows, 2, t, d, requires_grad=True)
    v = torch.randn(rows, 2, t, d, requires_grad=True)
    cuts = sorted({0, rows * t, *torch.randint(1, rows * t, (rows + 1,)).tolist()})
    for cu in (None, torch.tensor(cuts, dtype=torch.int32)):
        out, _ = varlen_attention(None, q, k, v, None, cu_seq_lens_q=cu)
        assert out.shape == (rows, t, 4, d)
        bounds = list(range(0, rows * t + 1, t)) if cu is None else cuts

        def flat(x):  # (heads, rows * t, D): the rows one after another
            return x.transpose(0, 1).reshape(x.shape[1], rows * t, d)

        fq, fk, fv = flat(q), flat(k), flat(v)
        want = torch.cat(
            [
                F.scaled_dot_product_attention(
                    fq[:, s:e], fk[:, s:e], fv[:, s:e], is_causal=True, enable_gqa=True
                )
                for s, e in itertools.pairwise(bounds)
            ],
            dim=1,
        )  # (H, rows * t, D)
        got = out.reshape(rows * t, 4, d).transpose(0, 1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        g_got = torch.autograd.grad(got.square().sum(), (q, k, v))
        g_want = torch.autograd.grad(want.square().sum(), (q, k, v))
        for a, b in zip(g_got, g_want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_varlen_attention_refuses_a_padding_mask() -> None:
    torch = pytest.importorskip("torch")
    from lorafleet.train.attention import varlen_attention

    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="not an attention mask"):
        varlen_attention(None, q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool))
