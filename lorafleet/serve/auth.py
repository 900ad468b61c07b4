"""API keys and per-key rate limits of the OpenAI routes (runtime and router).

Off unless a keys file is given (``--api-keys-file`` or ``$LORAFLEET_API_KEYS_FILE``; in a
cluster, a mounted Secret). The file has one key per line, ``NAME:KEY`` or
``NAME:KEY:RPM``; blank lines and lines starting with ``#`` are skipped. ``NAME`` is what
logs and errors may show; ``KEY`` never leaves this module. ``RPM`` is the key's
requests per minute (the server's ``--api-key-rpm`` when left out).

With keys configured, every ``/openai/v1`` request needs ``Authorization: Bearer KEY``:
a missing or unknown key answers 401, a key over its rate 429 with ``Retry-After``, both
in OpenAI's error shape. Keys are compared in constant time (each given key against
every configured one, so the time does not tell which key nearly matched). Each key's
limit is a token bucket: up to ``RPM`` requests at once, refilled at ``RPM / 60`` per
second.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.errors import LorafleetError

__all__ = ["DEFAULT_RPM", "ApiKey", "ApiKeys", "Refusal"]

# Requests per minute of a key whose line sets none (lorafleet serve --api-key-rpm).
DEFAULT_RPM = 600
# Key names appear in logs and error messages: plain words only.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class ApiKey:
    """One client's key: its name (loggable), its secret and its rate."""

    name: str
    secret: str
    rpm: int

    def __repr__(self) -> str:  # the secret never reaches a log or a traceback
        return f"ApiKey(name={self.name!r}, rpm={self.rpm})"


@dataclass(frozen=True)
class Refusal:
    """Why a request was turned away: what to answer and how to count it.

    Attributes:
        status: 401 or 429.
        reason: the metrics label: ``missing_key``, ``invalid_key`` or ``rate_limited``.
        message: the error message for the client (names no secret).
        retry_after_s: seconds until the key has room again (429 only).
    """

    status: int
    reason: str
    message: str
    retry_after_s: int | None = None

    def body(self) -> dict[str, Any]:
        """The answer's JSON, in OpenAI's error shape."""
        kind = "invalid_request_error" if self.status == 401 else "rate_limit_error"
        code = "invalid_api_key" if self.status == 401 else "rate_limit_exceeded"
        return {"error": {"message": self.message, "type": kind, "param": None, "code": code}}

    def headers(self) -> dict[str, str]:
        """``WWW-Authenticate`` on a 401, ``Retry-After`` on a 429."""
        if self.retry_after_s is not None:
            return {"retry-after": str(self.retry_after_s)}
        return {"www-authenticate": "Bearer"}


class _Bucket:
    """A token bucket: ``capacity`` requests at once, refilled at ``rate`` per second."""

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity, self.rate = capacity, capacity / 60
        self.tokens, self.stamp = float(capacity), now

    def take(self, now: float) -> float:
        """Take one token; 0 when granted, else the seconds until one is there."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class ApiKeys:
    """The configured keys and their rate limits; used on the event loop only (no locks).

    Args:
        keys: the keys; names and secrets must be unique.
        clock: monotonic seconds (tests pass a fake one).

    Raises:
        LorafleetError: on a repeated name or secret.
    """

    def __init__(self, keys: list[ApiKey], clock: Callable[[], float] = time.monotonic) -> None:
        if not keys:
            raise LorafleetError("no API keys given")
        if len({k.name for k in keys}) != len(keys) or len({k.secret for k in keys}) != len(keys):
            raise LorafleetError("API key names and keys must each be unique")
        self._keys = list(keys)
        # Compare fixed-length digests: compare_digest's time then depends on neither length.
        self._digests = [(hashlib.sha256(k.secret.encode()).digest(), k) for k in keys]
        self._clock = clock
        now = clock()
        self._buckets = {k.name: _Bucket(k.rpm, now) for k in keys}

    @property
    def names(self) -> list[str]:
        """The keys' names, in file order."""
        return [k.name for k in self._keys]

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        default_rpm: int = DEFAULT_RPM,
        clock: Callable[[], float] = time.monotonic,
    ) -> ApiKeys:
        """Read a keys file (see the module docstring).

        Raises:
            LorafleetError: naming the file and line of a malformed entry (never its key).
        """
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise LorafleetError(
                f"{path}: cannot read the API keys file ({exc.__class__.__name__})"
            ) from None
        keys = []
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            keys.append(_parse_line(line, f"{path}:{number}", default_rpm))
        if not keys:
            raise LorafleetError(f"{path}: no API keys (expected NAME:KEY lines)")
        try:
            return cls(keys, clock)
        except LorafleetError as exc:
            raise LorafleetError(f"{path}: {exc}") from None

    def admit(self, authorization: str | None) -> Refusal | None:
        """Check one request's ``Authorization`` header and take from its key's bucket.

        Returns:
            ``None`` to let the request through, else why not.
        """
        scheme, _, given = (authorization or "").strip().partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            return Refusal(
                401,
                "missing_key",
                "You didn't provide an API key: send 'Authorization: Bearer KEY'.",
            )
        digest = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
        found = None
        for expected, key in self._digests:  # no early exit: every key is compared
            if secrets.compare_digest(digest, expected):
                found = key
        if found is None:
            return Refusal(401, "invalid_key", "Incorrect API key provided.")
        wait = self._buckets[found.name].take(self._clock())
        if wait:
            retry = max(1, math.ceil(wait))
            message = (
                f"Rate limit reached for API key {found.name!r}: {found.rpm} requests per "
                f"minute; retry in {retry} s."
            )
            return Refusal(429, "rate_limited", message, retry)
        return None


def _parse_line(line: str, where: str, default_rpm: int) -> ApiKey:
    parts = line.split(":")
    if len(parts) not in (2, 3) or not all(p.strip() for p in parts):
        raise LorafleetError(f"{where}: expected NAME:KEY or NAME:KEY:RPM")
    name, secret = parts[0].strip(), parts[1].strip()
    if not _NAME.fullmatch(name):
        raise LorafleetError(f"{where}: key name {name!r} must match {_NAME.pattern}")
    rpm = default_rpm
    if len(parts) == 3:
        text = parts[2].strip()
        if not text.isdigit() or int(text) < 1:
            raise LorafleetError(f"{where}: RPM must be a whole number of at least 1")
        rpm = int(text)
    return ApiKey(name, secret, rpm)
