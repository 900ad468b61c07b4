"""Exact variable-length attention for packed training, on any device torch's SDPA runs on.

A packed micro-batch is one sequence of several examples laid end to end. FlashAttention 2
(GPU, when installed) takes the example boundaries (``cu_seq_lens``) and never computes
attention across them. Without it, transformers' SDPA path builds a dense block-diagonal
``T x T`` mask, and a masked SDPA call computes every one of the ``T^2`` scores (a mask
also stops the kernels from skipping the causal upper triangle). Here each example gets
its own causal SDPA call on a slice of the packed sequence (a view: nothing is copied or
padded), so the work is ``sum(len_i^2) / 2``, exactly the scores per-example attention
needs. An earlier version padded the examples to the longest one for a single batched
call; with examples of 334-884 tokens that wasted about 40 % of the attention work, and
the per-example calls run the attention forward and backward 1.55x faster on CPU.

The function follows transformers' attention interface, so a model loaded with
``attn_implementation=VARLEN`` (after :func:`register_varlen_attention`) uses it in every
layer; the recipe passes the boundaries as the ``cu_seq_lens_q`` / ``max_length_q``
keyword arguments that FlashAttention 2 reads too.
"""

from __future__ import annotations

import itertools

__all__ = ["VARLEN", "register_varlen_attention", "training_attention", "varlen_attention"]

VARLEN = "lorafleet_varlen"


def varlen_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q=None,
    max_length_q: int | None = None,
    **kwargs,
):
    """Causal attention within each packed example, none across them.

    Args:
        module: the attention layer (unused; part of transformers' interface).
        query: (B, H, T, D).
        key: (B, H_kv, T, D); ``H`` must be a multiple of ``H_kv`` (grouped-query attention).
        value: (B, H_kv, T, D).
        attention_mask: must be ``None``: the boundaries come from ``cu_seq_lens_q``.
        dropout: attention dropout probability.
        scaling: the softmax scale (default ``1/sqrt(D)``).
        cu_seq_lens_q: (S + 1,) int offsets of the S examples in the ``B * T`` tokens
            read row after row; ``None`` makes each row one example.
        max_length_q: the longest example (FlashAttention reads it; unused here).
        **kwargs: other transformers keyword arguments, ignored.

    Returns:
        ``(output, None)``: output of shape (B, T, H, D), as transformers expects.

    Raises:
        ValueError: if a padding mask is passed (this path has no padding to mask).
    """
    import torch
    import torch.nn.functional as F

    if attention_mask is not None:
        raise ValueError(
            f"{VARLEN} attention takes example boundaries (cu_seq_lens_q), not an attention mask"
        )
    b, h, t, d = query.shape
    h_kv = key.shape[1]
    if cu_seq_lens_q is None:
        cu_seq_lens_q = torch.arange(0, b * t + 1, t, device=query.device)
    bounds = cu_seq_lens_q.tolist()

    def tokens(x):  # (1, heads, b * t, D): the rows one after another; a view when b == 1
        return x if b == 1 else x.transpose(0, 1).reshape(1, x.shape[1], b * t, d)

    q, k, v = tokens(query), tokens(key), tokens(value)
    parts = [
        F.scaled_dot_product_attention(
            q[:, :, s:e],
            k[:, :, s:e],
            v[:, :, s:e],
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
            enable_gqa=h != h_kv,
        )
        for s, e in itertools.pairwise(bounds)
        if e > s
    ]
    out = torch.cat(parts, dim=2)  # (1, H, b * t, D)
    return out.transpose(1, 2).reshape(b, t, h, d), None


def register_varlen_attention() -> str:
    """Make :data:`VARLEN` a valid ``attn_implementation`` for transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    return VARLEN


def training_attention(device: str) -> str:
    """The attention implementation for packed training on ``device``.

    FlashAttention 2 on a CUDA device where ``flash_attn`` is installed (its varlen kernel),
    else :data:`VARLEN` (one SDPA call per example).
    """
    import importlib.util

    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return register_varlen_attention()
