"""Tokenized chats as right-padded tensor batches, for a model's loss on assistant tokens.

The held-out loss runs on these batches, and they are the ordinary padded reference that
the training recipe's padding-free packing must reproduce.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorafleet.chat import IGNORE_INDEX, TokenizedExample

__all__ = ["collate"]


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch.

    Args:
        examples: the tokenized examples, B of them.
        pad_id: the token id that pads ``input_ids``; padded labels are ``IGNORE_INDEX``.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels``: LongTensors of shape (B, T_max).
    """
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
