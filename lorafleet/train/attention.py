"""Exact variable-length attention for packed training, on any device torch's SDPA runs on.

A packed micro-batch is one sequence of several examples laid end to end. FlashAttention 2
(GPU, when installed) takes the example boundaries (``cu_seq_lens``) and never computes
attention across them. Without it, transformers' SDPA path builds a dense block-diagonal
``T x T`` mask, and a masked SDPA call computes every one of the ``T^2`` scores (a mask
also stops the kernels from skipping the causal upper triangle). Here the tokens are
instead regrouped into one zero-padded batch of examples, ``(n_examples, longest, ...)``,
and a single causal SDPA call runs on it: the work is ``n_examples x longest^2 / 2``
instead of ``T^2``, and the result is exactly per-example attention. Right padding is
never seen by a real token under a causal mask, and the padded rows' outputs are dropped.

The function follows transformers' attention interface, so a model loaded with
``attn_implementation=VARLEN`` (after :func:`register_varlen_attention`) uses it in every
layer; the recipe passes the boundaries as the ``cu_seq_lens_q`` / ``max_length_q``
keyword arguments that FlashAttention 2 reads too.
"""

from __future__ import annotations

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
        max_length_q: the longest example (computed when not given).
        **kwargs: other transformers keyword arguments, ignored.

    Returns:
        ``(output, None)``: output of shape (B, T, H, D), as transformers expects.

    Raises:
        ValueError: if a padding mask is passed (this path has no padding to mask).
    """
    import torch
    import torch.nn.functional as F

    if attention_mask is not None:
        raise ValueError(f"{VARLEN} attention takes example boundaries (cu_seq_lens_q), not an attention mask")
    b, h, t, d = query.shape
    h_kv = key.shape[1]
    if cu_seq_lens_q is None:
        cu_seq_lens_q = torch.arange(0, b * t + 1, t, device=query.device)
    cu = cu_seq_lens_q.to(device=query.device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    longest = int(max_length_q) if max_length_q is not None else int(lengths.max())
    # valid[s, j]: the j-th token of example s exists; True cells in row-major order are the tokens in order.
    valid = torch.arange(longest, device=query.device)[None, :] < lengths[:, None]

    def by_example(x, heads: int):
        tokens = x.transpose(1, 2).reshape(b * t, heads, d)
        padded = tokens.new_zeros((len(lengths), longest, heads, d))
        padded[valid] = tokens
        return padded.transpose(1, 2)  # (S, heads, longest, D)

    out = F.scaled_dot_product_attention(
        by_example(query, h),
        by_example(key, h_kv),
        by_example(value, h_kv),
        dropout_p=dropout,
        is_causal=True,
        scale=scaling,
        enable_gqa=h != h_kv,
    )
    return out.transpose(1, 2)[valid].reshape(b, t, h, d), None


def register_varlen_attention() -> str:
    """Make :data:`VARLEN` a valid ``attn_implementation`` for transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    return VARLEN


def training_attention(device: str) -> str:
    """The attention implementation for packed training on ``device``.

    FlashAttention 2 on a CUDA device where ``flash_attn`` is installed (its varlen kernel),
    else :data:`VARLEN` (SDPA per example, batched).
    """
    import importlib.util

    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return register_varlen_attention()
