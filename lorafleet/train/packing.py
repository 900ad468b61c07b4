"""Padding-free packing: several tokenized examples share one row, none sees another.

Each example keeps its own position ids (restarting at 0). Given ``position_ids`` and no
``attention_mask``, transformers (5.x) finds the example boundaries where positions restart
and builds a block-diagonal causal mask (SDPA / eager on CPU) or calls FlashAttention's
variable-length kernel (GPU), so attention never crosses from one example to the next.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from lorafleet.chat import IGNORE_INDEX, TokenizedExample

__all__ = ["collate_rows", "pack_rows"]


def pack_rows(lengths: Sequence[int], max_len: int, rng: random.Random, packing: bool = True) -> list[list[int]]:
    """Group example indices into rows of at most ``max_len`` tokens, in a random order.

    Examples are shuffled, then placed first-fit (into the first row that still has room),
    and the rows are shuffled again so long and short rows mix across batches.

    Args:
        lengths: token count of each example (each at most ``max_len``).
        max_len: row capacity in tokens.
        rng: the source of randomness; the same state gives the same rows.
        packing: ``False`` puts one example per row (ordinary padded batches).

    Returns:
        Rows of example indices.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not packing:
        return [[i] for i in order]
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        slot = next((r for r, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([i])
            room.append(max_len - n)
        else:
            rows[slot].append(i)
            room[slot] -= n
    rng.shuffle(rows)
    return rows


def collate_rows(rows: Sequence[Sequence[TokenizedExample]], pad_id: int):
    """Concatenate each row's examples and right-pad the rows to one width.

    The first label of every example is ignored, so the last token of one example is
    never trained to predict the first token of the next. Padding gets its own positions
    (restarting at 0), so it forms a separate block that no real token attends to.

    Args:
        rows: the examples of each row.
        pad_id: the token id used for padding.

    Returns:
        ``input_ids``, ``position_ids``, ``labels``: LongTensors of shape (B, T_max), and
        ``n_tokens``: the number of real (non-pad) tokens.
    """
    import torch

    ids, pos, labels = [], [], []
    for row in rows:
        ids.append([t for e in row for t in e.input_ids])
        pos.append([p for e in row for p in range(len(e.input_ids))])
        labels.append([t for e in row for t in [IGNORE_INDEX, *e.labels[1:]]])
    width = max(len(r) for r in ids)
    n_tokens = sum(len(r) for r in ids)
    for i in range(len(rows)):
        pad = width - len(ids[i])
        ids[i] += [pad_id] * pad
        pos[i] += list(range(pad))
        labels[i] += [IGNORE_INDEX] * pad
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "position_ids": torch.tensor(pos, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "n_tokens": n_tokens,
    }
