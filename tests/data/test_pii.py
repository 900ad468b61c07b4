"""Personal data: what is found and scrubbed, and what must stay (budgets, years, counts)."""

from __future__ import annotations

import pytest

from lorafleet.data.pii import find_pii, record_pii, scrub, scrub_record
from lorafleet.records import Record


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        ("mail me at jane.doe+work@example.co.uk today", "mail me at [EMAIL] today"),
        ("call +44 20 7946 0958 now", "call [PHONE] now"),
        ("my number is (415) 555-0132.", "my number is [PHONE]."),
        ("text 415-555-0132", "text [PHONE]"),
        ("card 4111 1111 1111 1111 exp 12/29", "card [CARD] exp 12/29"),
        ("card 4111-1111-1111-1111", "card [CARD]"),
        ("IBAN DE89 3704 0044 0532 0130 00 please", "IBAN [IBAN] please"),
        ("IBAN GB82WEST12345698765432", "IBAN [IBAN]"),
        ("Just message me on WhatsApp", "Just [OFF-PLATFORM]"),
        ("let's chat on Telegram instead", "[OFF-PLATFORM] instead"),
        ("add me on skype", "[OFF-PLATFORM]"),
        ("you can pay me directly and skip the fee", "you can [OFF-PLATFORM] and skip the fee"),
        ("contact me outside the platform", "[OFF-PLATFORM]"),
    ],
)
def test_found_and_replaced_with_a_typed_placeholder(text: str, scrubbed: str) -> None:
    assert scrub(text)[0] == scrubbed


@pytest.mark.parametrize(
    "text",
    [
        "2015-2017: Analyst, retail bank. 2017-2020: Data scientist",
        "$0.08-0.12 per word for 7,000 words",
        "a booking plugin that handles 1,200 appointments a month",
        "Budget: Fixed price $4,800, 6 weeks, 3 rounds",
        "card-like but not Luhn: 4111 1111 1111 1112",
        "IBAN-like but wrong check digits: DE00 3704 0044 0532 0130 00",
        "released 2024-05-01, version 10.0.0.1",
        "keep all messages on the platform",
        "the candidate asks to move payment outside the platform; should be flagged",
    ],
)
def test_marketplace_text_is_left_alone(text: str) -> None:
    assert find_pii(text) == []


def test_off_platform_asks_count_only_in_assistant_turns() -> None:
    # A quoted proposal that asks for WhatsApp is what a candidate evaluator must learn to flag.
    ask = "Candidate A: message me on WhatsApp, it is faster."
    rec = Record(
        id="a",
        task="candidate-evaluator",
        source="human",
        messages=[
            {"role": "user", "content": ask},
            {"role": "assistant", "content": "Sure, message me on WhatsApp or mail x@y.io"},
        ],
    )
    assert record_pii(rec) == {"off-platform": 1, "email": 1}
    scrubbed, counts = scrub_record(rec)
    assert scrubbed.messages[0].content == ask
    assert scrubbed.messages[1].content == "Sure, [OFF-PLATFORM] or mail [EMAIL]"
    assert counts == {"off-platform": 1, "email": 1}
    clean = rec.model_copy(update={"messages": rec.messages[:1]})
    assert scrub_record(clean) == (clean, {})
