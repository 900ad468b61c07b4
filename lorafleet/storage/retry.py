"""Which store errors are worth retrying, how long to wait, and how a failure reads.

:class:`RetryPolicy` is the backoff; :func:`is_transient` tells throttling, server
trouble and connection failures (retried) from a missing object, denied access or a
failed precondition (not). The private helpers classify an error from S3 (botocore),
GCS (gcsfs, google-auth) or the OS and explain it in one line.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import botocore.exceptions
import google.auth.exceptions

__all__ = ["RetryPolicy", "is_transient"]


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff for transient errors (see :func:`is_transient`).

    With the defaults an operation is tried at most 4 times, sleeping about 0.25, 0.5 and
    1 s between tries (each sleep is jittered between half and all of its step): under
    2 s of sleep in all, plus each try's own connect timeout.

    Attributes:
        attempts: Tries in all, the first included (1 disables retrying).
        base_delay: The first step, in seconds; each later step doubles.
        max_delay: The cap on one step, in seconds.
    """

    attempts: int = 4
    base_delay: float = 0.25
    max_delay: float = 2.0

    def delays(self) -> Iterator[float]:
        """Yield the sleep before each retry (``attempts - 1`` of them)."""
        for i in range(self.attempts - 1):
            step = min(self.max_delay, self.base_delay * 2**i)
            yield step / 2 + random.uniform(0, step / 2)


# Error codes and HTTP statuses that mean "try again": throttling, a busy or failing
# server, a timed-out request.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeoutException",
        "500",
        "502",
        "503",
        "504",
    }
)
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_TYPES = (
    ConnectionError,  # resets, refusals, broken pipes
    TimeoutError,  # asyncio and socket timeouts
    botocore.exceptions.ConnectionError,  # endpoint unreachable, connect timeout
    botocore.exceptions.HTTPClientError,  # connection closed, read timeout
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
)
_DENIED_CODES = frozenset(
    {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}
)
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412"})
# Modules whose exceptions are store failures (one line for the user), not lorafleet bugs.
_STORE_MODULES = ("aiobotocore", "aiohttp", "botocore", "fsspec", "gcsfs", "google", "s3fs")


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the chain of exceptions it was raised from."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def _code_and_status(error: BaseException) -> tuple[str | None, int | None]:
    """The store's error code and HTTP status, where the exception carries them."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code, status
    for attribute in ("code", "status"):  # gcsfs HttpError.code, aiohttp .status
        value = getattr(error, attribute, None)
        if isinstance(value, int):
            return str(value), value
    return None, None


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or what it was raised from) is worth retrying.

    Transient: throttling (``SlowDown``, ``Throttling*``, ``TooManyRequests``, HTTP 429),
    server trouble (``InternalError``, ``ServiceUnavailable``, HTTP 500/502/503/504),
    request timeouts (``RequestTimeout``, HTTP 408), and connection failures (resets,
    refusals, closed connections, connect and read timeouts). Everything else (missing
    object or bucket, denied access, failed precondition, bad request) is not.
    """
    for cause in _causes(error):
        if isinstance(cause, _TRANSIENT_TYPES):
            return True
        code, status = _code_and_status(cause)
        if code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS:
            return True
    return False


def _is_store_error(error: BaseException) -> bool:
    if isinstance(
        error, OSError | botocore.exceptions.BotoCoreError | botocore.exceptions.ClientError
    ):
        return True
    return type(error).__module__.split(".")[0] in _STORE_MODULES


def _is_precondition(error: BaseException) -> bool:
    for cause in _causes(error):
        code, status = _code_and_status(cause)
        if code in _PRECONDITION_CODES or status in (409, 412):
            return True
    return isinstance(error, FileExistsError)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_missing(error: BaseException) -> bool:
    """A missing object (not a missing bucket)."""
    codes = {_code_and_status(c)[0] for c in _causes(error)}
    return "NoSuchBucket" not in codes and (
        isinstance(error, FileNotFoundError) or bool(codes & {"NoSuchKey", "404"})
    )


def _explain(error: BaseException, tries: int, missing: str) -> str:
    """One line saying why a store operation failed (``missing``: what a 404 means)."""
    codes = [_code_and_status(c) for c in _causes(error)]
    code = next((c for c, _ in codes if c), None)
    if any(c == "NoSuchBucket" for c, _ in codes):
        return "the bucket does not exist"
    if _is_missing(error):
        return missing
    if isinstance(error, IsADirectoryError):
        return "is a directory, not an object"
    if isinstance(error, NotADirectoryError):
        return "a parent of this path is a file, not a directory"
    if (
        isinstance(error, PermissionError)
        or any(c in _DENIED_CODES or s in (401, 403) for c, s in codes)
        or str(error).startswith("Forbidden")
    ):
        return f"access denied ({code or 'permission'}): {_first_line(error)}"
    if isinstance(error, botocore.exceptions.NoCredentialsError):
        return (
            "no AWS credentials found (environment, shared config, IRSA web identity, "
            "instance or container role)"
        )
    if isinstance(error, google.auth.exceptions.DefaultCredentialsError):
        return "no Google credentials found (application default credentials, Workload Identity)"
    if is_transient(error):
        after = f" after {tries} tries" if tries > 1 else ""
        return f"store unreachable or unavailable{after}: {_first_line(error)}"
    return f"{type(error).__name__}: {_first_line(error)}"
