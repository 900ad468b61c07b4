"""Chat formatting and assistant-only label masks, for any tokenizer with a chat template.

Labels are found by rendering the conversation prefix by prefix: the tokens that the
``i``-th assistant turn adds after the generation prompt are the ones the loss sees.
This works for any prefix-stable template (ChatML, Llama 3, ...), not only ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lorafleet.records import Message

__all__ = ["CHATML_TEMPLATE", "IGNORE_INDEX", "TokenizedExample", "encode_chat", "prompt_messages"]

IGNORE_INDEX = -100

# The demo base model's template (ChatML). Real base models bring their own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TokenizedExample:
    """One conversation as token ids with labels for the assistant turns only.

    Attributes:
        input_ids: token ids, length T.
        labels: same length T; ``IGNORE_INDEX`` where the loss must not look.
    """

    input_ids: list[int]
    labels: list[int]

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def _as_dicts(messages: Sequence[Message | dict]) -> list[dict]:
    return [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]


def _ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_chat(
    tokenizer, messages: Sequence[Message | dict], max_length: int | None = None
) -> TokenizedExample:
    """Tokenize a conversation; only assistant turns carry labels.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        messages: the turns, OpenAI style.
        max_length: keep only the last this-many tokens, so the final answer survives.

    Returns:
        The token ids and labels.

    Raises:
        ValueError: if the template is not prefix-stable, so masks cannot be trusted.
    """
    msgs = _as_dicts(messages)
    input_ids = _ids(tokenizer, msgs, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(input_ids)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = len(_ids(tokenizer, msgs[:i], add_generation_prompt=True))
        through = _ids(tokenizer, msgs[: i + 1], add_generation_prompt=False)
        if input_ids[: len(through)] != through:
            raise ValueError("chat template is not prefix-stable; cannot mask assistant turns")
        labels[start : len(through)] = input_ids[start : len(through)]
    if max_length is not None and len(input_ids) > max_length:
        input_ids, labels = input_ids[-max_length:], labels[-max_length:]
    return TokenizedExample(input_ids=input_ids, labels=labels)


def prompt_messages(messages: Sequence[Message | dict]) -> list[dict]:
    """The conversation up to (not including) its last assistant turn: what a model is asked."""
    msgs = _as_dicts(messages)
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:last]
