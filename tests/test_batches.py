"""Right-padded batches of tokenized chats."""

from __future__ import annotations

import torch

from lorafleet.batches import collate
from lorafleet.chat import IGNORE_INDEX, TokenizedExample


def test_rows_are_right_padded_to_the_longest_and_padding_is_masked() -> None:
    # Given two examples of different lengths
    short = TokenizedExample(input_ids=[5, 6], labels=[IGNORE_INDEX, 6])
    long = TokenizedExample(input_ids=[7, 8, 9], labels=[IGNORE_INDEX, 8, 9])

    # When they are collated with pad id 0
    batch = collate([short, long], pad_id=0)

    # Then every row is as long as the longest, padded on the right, and the pad is neither
    # attended to nor scored
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[5, 6, 0], [7, 8, 9]]))
    torch.testing.assert_close(batch["attention_mask"], torch.tensor([[1, 1, 0], [1, 1, 1]]))
    torch.testing.assert_close(
        batch["labels"], torch.tensor([[IGNORE_INDEX, 6, IGNORE_INDEX], [IGNORE_INDEX, 8, 9]])
    )
