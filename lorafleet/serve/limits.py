"""Server-side limits of one completion request: what a client may ask the runtime for.

A request over a limit is refused before it is queued, with HTTP 400 and a message that
names the limit and the ``lorafleet serve`` option that sets it: no client can hold a batch
hostage with a huge budget or prompt, or make the server buffer an unbounded body.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RequestLimits"]


@dataclass(frozen=True)
class RequestLimits:
    """Limits of one ``/openai/v1`` completion request.

    Attributes:
        max_tokens: the largest generation budget a request may ask for
            (``max_tokens`` / ``max_completion_tokens``).
        max_prompt_chars: the longest prompt, in characters (a completion's ``prompt``, or
            all of a chat's message contents together). Characters, not tokens: the request
            is checked in the server's event loop, away from the tokenizer that the batch
            thread is using.
        max_body_bytes: the largest request body.
    """

    max_tokens: int = 4096
    max_prompt_chars: int = 256_000
    max_body_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_prompt_chars", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
