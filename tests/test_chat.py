"""Assistant-only label masks."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from lorafleet.chat import IGNORE_INDEX, encode_chat, prompt_messages

CONV = [
    {"role": "system", "content": "You help clients write job posts."},
    {"role": "user", "content": "I need a logo."},
    {"role": "assistant", "content": "What style do you like?"},
    {"role": "user", "content": "Minimal, blue."},
    {"role": "assistant", "content": "Title: Minimal blue logo"},
]


def test_labels_cover_exactly_the_assistant_turns(tiny_base: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_base)
    ex = encode_chat(tok, CONV)
    assert len(ex.input_ids) == len(ex.labels)
    # Given the labelled spans, when decoded, then they are the assistant turns (each with its end token).
    spans, current = [], []
    for tid, lab in zip(ex.input_ids, ex.labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == tid
            current.append(tid)
        elif current:
            spans.append(tok.decode(current))
            current = []
    if current:
        spans.append(tok.decode(current))
    assert spans == ["What style do you like?<|im_end|>\n", "Title: Minimal blue logo<|im_end|>\n"]
    # The whole conversation tokenizes to the same ids as the template's rendering.
    assert (
        ex.input_ids
        == tok(tok.apply_chat_template(CONV, tokenize=False), add_special_tokens=False)["input_ids"]
    )


def test_truncation_and_prompt(tiny_base: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_base)
    assert len(encode_chat(tok, CONV, max_length=10).input_ids) == 10
    assert prompt_messages(CONV) == CONV[:4]
