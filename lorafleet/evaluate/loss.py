"""Held-out loss on assistant tokens.

The loss of an arm is the token-weighted mean negative log-likelihood of the reference
assistant turns; :func:`~lorafleet.chat.encode_chat` decides which tokens those are, for
every engine alike (:func:`encode_records`). :func:`heldout_loss` runs it on a torch model;
the vLLM engine (:mod:`lorafleet.evaluate.vllm_engine`) sums the same tokens' prompt
logprobs and reports through the same :func:`loss_summary`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lorafleet.batches import collate
from lorafleet.chat import IGNORE_INDEX, TokenizedExample, encode_chat
from lorafleet.records import Record

__all__ = ["encode_records", "heldout_loss", "loss_summary"]


def encode_records(
    tokenizer, records: Sequence[Record], max_seq_len: int = 2048
) -> list[TokenizedExample]:
    """The records as token ids with labels on their assistant turns only.

    Args:
        tokenizer: the base's tokenizer (chat template required).
        records: the held-out records.
        max_seq_len: keep only the last this-many tokens of a conversation.
    """
    return [encode_chat(tokenizer, r.messages, max_length=max_seq_len) for r in records]


def loss_summary(total: float, count: int) -> dict:
    """``{"loss", "perplexity", "tokens"}`` from a summed NLL over ``count`` tokens."""
    loss = total / max(1, count)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def heldout_loss(
    model, tokenizer, records: Sequence[Record], batch_size: int = 8, max_seq_len: int = 2048
) -> dict:
    """Token-weighted mean negative log-likelihood of the assistant turns.

    Args:
        model: a causal LM (a PEFT model is evaluated with whatever adapter is active).
        tokenizer: its tokenizer (chat template required).
        records: the held-out records.
        batch_size: records per forward pass.
        max_seq_len: truncation length.

    Returns:
        ``{"loss": float, "perplexity": float, "tokens": int}``.
    """
    device = next(model.parameters()).device
    examples = encode_records(tokenizer, records, max_seq_len)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = {
                k: v.to(device)
                for k, v in collate(examples[i : i + batch_size], tokenizer.pad_token_id).items()
            }
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits.float()
            labels = batch["labels"][:, 1:]
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)),
                labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total += float(nll)
            count += int((labels != IGNORE_INDEX).sum())
    return loss_summary(total, count)
