"""Padding-free packing: several tokenized examples share one sequence, none sees another.

Examples are grouped into rows of at most ``max_seq_len`` tokens (first-fit); a micro-batch
of rows is then laid end to end as one sequence with no padding. Each example keeps its own
position ids (restarting at 0) and the example boundaries travel as ``cu_seq_lens``, which
the recipe's attention (:mod:`lorafleet.train.attention`, or FlashAttention's varlen kernel
on GPU) uses so that attention never crosses from one example to the next.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from lorafleet.chat import IGNORE_INDEX, TokenizedExample

__all__ = ["collate_packed", "pack_rows"]


def pack_rows(
    lengths: Sequence[int], max_len: int, rng: random.Random, packing: bool = True
) -> list[list[int]]:
    """Group example indices into rows of at most ``max_len`` tokens, in a random order.

    Examples are shuffled, then placed first-fit (into the first row that still has room),
    and the rows are shuffled again so long and short rows mix across batches.

    Args:
        lengths: token count of each example (each at most ``max_len``).
        max_len: row capacity in tokens.
        rng: the source of randomness; the same state gives the same rows.
        packing: ``False`` puts one example per row.

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


def collate_packed(rows: Sequence[Sequence[TokenizedExample]]):
    """Lay the rows' examples end to end as one sequence, with no padding at all.

    Rows only decide which examples share a micro-batch; attention never crosses an
    example boundary (:mod:`lorafleet.train.attention` or FlashAttention's varlen kernel
    read ``cu_seq_lens``), so the sequence needs no padding and no mask. The first label of
    every example is ignored, so the last token of one example is never trained to predict
    the first token of the next. The loss needs logits only where the next token is a label:
    ``logit_index`` lists those positions and ``targets`` the tokens they must predict, so the
    LM head and the cross-entropy run on assistant positions only.

    Args:
        rows: the examples of each row.

    Returns:
        A dict with ``input_ids``, ``position_ids``: LongTensors of shape (1, T);
        ``cu_seq_lens``: (S + 1,) start offsets of the S examples, then T; ``max_length``: the
        longest example; ``logit_index``: (K,) positions whose logits the loss uses;
        ``targets``: (K,) the token each must predict; ``n_tokens``: T, every one a real token.
    """
    import torch

    examples = [e for row in rows for e in row]
    ids = [t for e in examples for t in e.input_ids]
    pos = [p for e in examples for p in range(len(e.input_ids))]
    labels = torch.tensor(
        [t for e in examples for t in [IGNORE_INDEX, *e.labels[1:]]], dtype=torch.long
    )
    lengths = torch.tensor([len(e.input_ids) for e in examples], dtype=torch.long)
    nxt = labels[1:]  # position p predicts token p + 1
    logit_index = torch.nonzero(nxt != IGNORE_INDEX).squeeze(1)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "cu_seq_lens": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        "max_length": int(lengths.max()),
        "logit_index": logit_index,
        "targets": nxt[logit_index],
        "n_tokens": len(ids),
    }
