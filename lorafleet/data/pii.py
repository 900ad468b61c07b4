"""Personal data and off-platform contact in message text: find it, count it, scrub it.

Kinds, each with its typed placeholder:

- ``email``: e-mail addresses -> ``[EMAIL]``
- ``phone``: phone numbers (international ``+CC``, or 9-15 digits in 3+ groups) -> ``[PHONE]``
- ``card``: payment card numbers (13-19 digits passing the Luhn check) -> ``[CARD]``
- ``iban``: IBANs (country, check digits, BBAN; mod-97 checked) -> ``[IBAN]``
- ``off-platform``: first-person requests to move contact or payment off the platform
  ("message me on WhatsApp", "pay me directly") -> ``[OFF-PLATFORM]``

Callers choose the kinds per turn: an expert's own (assistant) turns must never ask to
leave the platform, but a user turn may quote such a request on purpose (the
candidate-evaluator learns to flag proposals that do).

Numbers are only flagged when their checksum or grouping says so: budgets, year ranges
and counts in job posts ("2015-2017", "$1,200", "7,000 words") must stay untouched.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from lorafleet.records import Message, Record

__all__ = ["KINDS", "PiiMatch", "find_pii", "kinds_for", "record_pii", "scrub", "scrub_record"]

KINDS = ("email", "phone", "card", "iban", "off-platform")

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
PHONE = re.compile(
    r"(?<![\w$.,/-])(?:\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]?\d{2,4}){1,4}"
    r"|\(\d{2,4}\)[\s.-]?\d{2,4}(?:[\s.-]\d{2,4}){1,3}"
    r"|\d{2,4}(?:[\s.-]\d{2,4}){2,4})(?![\w$%/-]|\.\d|,\d)"
)
APPS = r"(?:whats\s?app|telegram|skype|signal|wechat|viber|discord|my (?:personal )?(?:e-?mail|phone|number|cell))"
OFF_PLATFORM = re.compile(
    rf"\b(?:(?:message|text|call|contact|reach|ping|add|email|find|dm)\s+(?:me|us)\s+(?:on|at|via|through|over)\s+{APPS}"
    rf"|(?:let'?s|can we|we can|shall we)\s+(?:talk|chat|continue|move|connect)\s+(?:on|to|via|over)\s+{APPS}"
    r"|pay\s+(?:me|us)\s+(?:directly|outside|off)\b"
    r"|(?:contact|pay|email|call|text)\s+(?:me|us)\s+(?:outside|off)\s+(?:of\s+)?(?:the|this)\s+(?:platform|site))",
    re.IGNORECASE,
)

# Cheap prefilters (C-speed scans) so the full patterns only run on text that can match:
# every phone, card and IBAN has a run of 8+ digits and separators.
NUMBER_RUN = re.compile(r"\d[\d \-().]{6,}\d")
OFF_PLATFORM_WORDS = (
    "whats",
    "telegram",
    "skype",
    "signal",
    "wechat",
    "viber",
    "discord",
    "directly",
    "outside",
    "off",
    "my e",
    "my phone",
    "my number",
    "my cell",
    "my personal",
)


@dataclass(frozen=True)
class PiiMatch:
    """One finding: its kind and where it is in the text."""

    kind: str
    start: int
    end: int


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iban_ok(text: str) -> bool:
    s = text.replace(" ", "")
    moved = s[4:] + s[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


def _phone_ok(text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    return 9 <= len(digits) <= 15 if not text.startswith("+") else 8 <= len(digits) <= 15


def find_pii(text: str, kinds: tuple[str, ...] = KINDS) -> list[PiiMatch]:
    """Every finding of the given kinds in ``text``, in order.

    Kinds are checked in the order e-mail, IBAN, card, phone, off-platform and
    overlapping findings keep the first, so a card number is never also a phone number.

    Args:
        text: the message content.
        kinds: which kinds to look for.

    Returns:
        The findings, by position.
    """
    found: list[PiiMatch] = []

    def add(kind: str, m: re.Match) -> None:
        if kind in kinds and not any(f.start < m.end() and m.start() < f.end for f in found):
            found.append(PiiMatch(kind, m.start(), m.end()))

    if "@" in text:
        for m in EMAIL.finditer(text):
            add("email", m)
    if NUMBER_RUN.search(text):
        for m in IBAN.finditer(text):
            if _iban_ok(m.group()):
                add("iban", m)
        for m in CARD.finditer(text):
            if _luhn(re.sub(r"\D", "", m.group())):
                add("card", m)
        for m in PHONE.finditer(text):
            if _phone_ok(m.group()):
                add("phone", m)
    if "off-platform" in kinds and any(w in text.lower() for w in OFF_PLATFORM_WORDS):
        for m in OFF_PLATFORM.finditer(text):
            add("off-platform", m)
    return sorted(found, key=lambda f: f.start)


def scrub(text: str, kinds: tuple[str, ...] = KINDS) -> tuple[str, Counter[str]]:
    """Replace every finding with its typed placeholder (``[EMAIL]``, ``[PHONE]``, ...).

    Args:
        text: the message content.
        kinds: which kinds to replace.

    Returns:
        The scrubbed text and the count of findings per kind.
    """
    found = find_pii(text, kinds)
    counts: Counter[str] = Counter(f.kind for f in found)
    for f in reversed(found):
        text = text[: f.start] + f"[{f.kind.upper()}]" + text[f.end :]
    return text, counts


def kinds_for(role: str) -> tuple[str, ...]:
    """The kinds checked in a turn of ``role``: off-platform asks only in the expert's own turns."""
    return KINDS if role == "assistant" else tuple(k for k in KINDS if k != "off-platform")


def record_pii(record: Record) -> Counter[str]:
    """Findings per kind over all turns of a record."""
    return Counter(f.kind for m in record.messages for f in find_pii(m.content, kinds_for(m.role)))


def scrub_record(record: Record) -> tuple[Record, Counter[str]]:
    """The record with every turn scrubbed, and the findings per kind (the record itself if none)."""
    total: Counter[str] = Counter()
    messages = []
    for m in record.messages:
        text, counts = scrub(m.content, kinds_for(m.role))
        total += counts
        messages.append(Message(role=m.role, content=text) if counts else m)
    return (record.model_copy(update={"messages": messages}) if total else record), total
