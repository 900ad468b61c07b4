"""OpenAI-compatible chat clients with the project's key, timeout and retry rules.

The teacher (synthesis), the gate's judge and the publish step's smoke test all talk to
chat endpoints through this module, so they share one set of rules:

- **Keys**: a key comes from a file (a mounted Kubernetes Secret) or an environment
  variable, as the settings name it; a named source that is missing or empty stops the run
  with one line naming it (:class:`ApiKeyError`), never unauthenticated requests. With no
  source named (local servers), a placeholder key is sent.
- **Retries**: timeouts, transport errors, 408, 409, 429 and 5xx are retried with
  exponential backoff and jitter; a server's ``Retry-After`` is honoured up to a cap, so a
  server asking for an hour cannot stall a run (:class:`RetryPolicy`).
- **Answers**: a completion without a choice or a message is a failed request
  (:class:`CompletionError`), not an ``IndexError`` deep in a caller.

The canary load generator (:mod:`lorafleet.rollout.loadgen`) stays on raw HTTP on purpose:
it must see every status code and header, without retries.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import openai

from lorafleet.errors import LorafleetError

__all__ = [
    "PLACEHOLDER_KEY",
    "ApiKeyError",
    "Completion",
    "CompletionError",
    "EndpointNames",
    "EndpointUnreachable",
    "RetryPolicy",
    "chat",
    "chat_async",
    "check_reachable",
    "make_async_client",
    "make_client",
    "openai_error_line",
    "preflight",
    "resolve_api_key",
]

log = logging.getLogger(__name__)


def openai_error_line(response) -> str:
    """The one line of an OpenAI-style error answer (vLLM's among them): its
    ``error.message`` (first line), else the body's first line; at most 300 characters.

    Args:
        response: an ``httpx.Response`` (anything with ``json()``, ``text`` and ``status_code``).
    """
    try:
        message = str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = response.text
    return (message.strip().splitlines() or [f"HTTP {response.status_code}"])[0][:300]


# Sent when no key source is configured: the openai client refuses to run without a key, and
# an explicit placeholder keeps it from picking up OPENAI_API_KEY and sending a hosted API's
# key to a local server.
PLACEHOLDER_KEY = "no-key"
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class ApiKeyError(LorafleetError):
    """A key source named in the settings is missing or empty."""


class CompletionError(RuntimeError):
    """A chat completion failed for good: refused, retried out, or malformed.

    Attributes:
        status: the HTTP status of a refused request; ``None`` when no HTTP error came back
            (transport failure, timeout, or a 200 whose body is no chat completion).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class EndpointNames:
    """What the user calls an endpoint's settings, for the lines that name them: the spec's
    fields (``synthesis.teacher.base_url``) or the command-line flags they typed
    (``--teacher-url``), so that an error points at what the user can change.

    Attributes:
        base_url: the name of the endpoint's URL.
        api_key_env: the name of the variable that holds the key.
        no_key: how to ask for no key at all (a local server), e.g.
            ``set api_key_env to null``.
        api_key_file: the name of the file that holds the key (``None`` where the settings
            have no key file).
    """

    base_url: str
    api_key_env: str
    no_key: str
    api_key_file: str | None = None

    @classmethod
    def spec(cls, block: str) -> EndpointNames:
        """The names of a spec block's fields, e.g. ``EndpointNames.spec("gate.judge")``."""
        return cls(
            f"{block}.base_url",
            f"{block}.api_key_env",
            "set api_key_env to null",
            f"{block}.api_key_file",
        )


def resolve_api_key(
    where: str | EndpointNames, env: str | None = None, file: str | Path | None = None
) -> str | None:
    """The API key from ``file`` if set (a mounted secret), else from the variable ``env``.

    Args:
        where: how the settings are named in an error: a spec block (e.g.
            ``synthesis.teacher``), or the names the user typed (:class:`EndpointNames`).
        env: the environment variable holding the key.
        file: the file holding the key; wins over ``env``.

    Returns:
        The key, or ``None`` when neither source is set (a server that needs no key).

    Raises:
        ApiKeyError: if the named file cannot be read or is empty, or the variable is unset or empty.
    """
    names = EndpointNames.spec(where) if isinstance(where, str) else where
    if file is not None:
        named = names.api_key_file or "the key file"
        try:
            key = Path(file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ApiKeyError(f"{names.api_key_file}: cannot read {file}: {exc.strerror}") from None
        if not key:
            raise ApiKeyError(f"{named}: {file} is empty")
        return key
    if env:
        key = os.environ.get(env, "").strip()
        if not key:
            raise ApiKeyError(
                f"{names.api_key_env}: environment variable {env} is not set or empty "
                f"(set it, or {names.no_key} for a server that needs no key)"
            )
        return key
    return None


# Why a thin wrapper and not the openai package's own retries: its backoff (0.5 s doubling
# to 8 s) is fixed, so the spec's ``backoff_s`` would be dead; its handling of a long
# ``Retry-After`` is not configurable and differs between the majors this project admits
# (1.x falls back to its backoff above 60 s; 3.x gives up at once above 120 s, so a single
# 429 asking for an hour fails the call instead of waiting a capped while); and it logs
# retries only at debug level. So its retries are switched off (``max_retries=0``) and the
# one call is retried here, on its public exceptions, which every admitted major shares.
@dataclass(frozen=True)
class RetryPolicy:
    """How failed requests are retried.

    Attributes:
        max_retries: retries after the first attempt.
        backoff_s: the first retry's delay; doubles each retry, plus up to 25% jitter.
        max_delay_s: no wait is longer, whatever the backoff or a ``Retry-After`` says.
    """

    max_retries: int = 4
    backoff_s: float = 1.0
    max_delay_s: float = 30.0

    def delay(self, attempt: int, exc: openai.APIError) -> float:
        """The wait before retrying after ``exc`` ended attempt ``attempt`` (0-based).

        Raises:
            CompletionError: if ``exc`` is not worth retrying or no retry is left.
        """
        status = exc.status_code if isinstance(exc, openai.APIStatusError) else None
        problem = _describe(exc)
        if status is not None and status not in RETRY_STATUS:
            raise CompletionError(problem, status) from exc
        if attempt >= self.max_retries:
            raise CompletionError(
                f"gave up after {attempt + 1} attempts: {problem}", status
            ) from exc
        wait = self.backoff_s * 2**attempt * (1 + 0.25 * random.random())
        asked = _retry_after(exc.response.headers) if status is not None else None
        if asked is not None:
            wait = max(wait, asked)
        wait = min(wait, self.max_delay_s)
        note = f" (Retry-After {asked:.0f}s capped)" if asked is not None and asked > wait else ""
        log.info(
            "%s failed (%s); retry %d of %d in %.1fs%s",
            exc.request.url,
            problem,
            attempt + 1,
            self.max_retries,
            wait,
            note,
        )
        return wait


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """A ``Retry-After`` header in seconds (delta-seconds or an HTTP date), if any."""
    value = (headers.get("retry-after") or "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        seconds = (email.utils.parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
    except (TypeError, ValueError):  # not a date, or one without a zone
        return None
    return max(0.0, seconds)


def _describe(exc: openai.APIError) -> str:
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, str) else json.dumps(exc.body)
        return f"HTTP {exc.status_code}: {body[:200]}"
    if isinstance(exc, openai.APITimeoutError):
        return "timed out"
    cause = exc.__cause__
    return f"{type(cause).__name__}: {cause}" if cause else f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Completion:
    """What a chat completion answered: the first choice's text and the model that says it answered."""

    text: str
    model: str | None


def _completion(response: object) -> Completion:
    """The text of a chat completion's first choice.

    Raises:
        CompletionError: if the body is no chat completion (no choices, no message, no text).
    """
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise CompletionError("malformed answer: no choices")
    message = getattr(choices[0], "message", None)
    content = getattr(message, "content", None)
    if message is None or not isinstance(content, str | None):
        raise CompletionError("malformed answer: the first choice has no message text")
    model = getattr(response, "model", None)
    return Completion(content or "", model if isinstance(model, str) else None)


class EndpointUnreachable(LorafleetError):
    """Nothing answers at an endpoint's address: one line naming the setting and the URL."""


def check_reachable(base_url: str, where: str, timeout_s: float = 5.0) -> None:
    """Fail within ``timeout_s`` when nothing listens at ``base_url``'s host and port.

    A run of many requests would otherwise spend every retry of every request on an
    address that refuses them all (minutes, a warning per request) before saying so.

    Raises:
        EndpointUnreachable: naming ``where`` (the setting or flag), the URL and the reason.
    """
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EndpointUnreachable(f"{where}: {base_url!r} is not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if isinstance(exc, TimeoutError | socket.timeout):
            reason = f"no answer in {timeout_s:g} s"
        raise EndpointUnreachable(f"{where}: {base_url} is unreachable ({reason})") from None


def preflight(
    base_url: str,
    names: EndpointNames,
    api_key_env: str | None = None,
    api_key_file: str | Path | None = None,
    timeout_s: float = 5.0,
) -> str | None:
    """Before the first request: the endpoint's key (:func:`resolve_api_key`), and a check
    that something listens at ``base_url`` (:func:`check_reachable`), both errors naming
    the settings as ``names`` says.

    Returns:
        The key, or ``None`` for a server that needs none.

    Raises:
        ApiKeyError: if a named key source is missing or empty.
        EndpointUnreachable: if nothing answers at ``base_url`` in ``timeout_s``.
    """
    key = resolve_api_key(names, api_key_env, api_key_file)
    check_reachable(base_url, names.base_url, timeout_s)
    return key


def make_client(base_url: str, api_key: str | None, timeout_s: float = 120.0) -> openai.OpenAI:
    """An OpenAI client for ``base_url`` with the project's rules (use with :func:`chat`).

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8080/openai/v1`` (before ``/chat/completions``).
        api_key: from :func:`resolve_api_key`; ``None`` sends a placeholder.
        timeout_s: per request.
    """
    return openai.OpenAI(
        base_url=base_url, api_key=api_key or PLACEHOLDER_KEY, timeout=timeout_s, max_retries=0
    )


def make_async_client(
    base_url: str, api_key: str | None, timeout_s: float = 120.0
) -> openai.AsyncOpenAI:
    """The asyncio twin of :func:`make_client` (use with :func:`chat_async`)."""
    return openai.AsyncOpenAI(
        base_url=base_url, api_key=api_key or PLACEHOLDER_KEY, timeout=timeout_s, max_retries=0
    )


def chat(client: openai.OpenAI, retry: RetryPolicy, **request: object) -> Completion:
    """One chat completion, retried by ``retry``.

    Args:
        client: from :func:`make_client`.
        retry: the retry policy.
        **request: the ``/chat/completions`` body: ``model``, ``messages``, ``max_tokens``, ...

    Raises:
        CompletionError: if it failed for good or the answer is malformed.
    """
    attempt = 0
    while True:
        try:
            response = client.chat.completions.create(**request)
        except (openai.APIConnectionError, openai.APIStatusError) as exc:
            time.sleep(retry.delay(attempt, exc))
            attempt += 1
        except ValueError as exc:  # a 200 whose body is not JSON
            raise CompletionError(f"malformed answer: {exc}") from exc
        else:
            return _completion(response)


async def chat_async(
    client: openai.AsyncOpenAI, retry: RetryPolicy, **request: object
) -> Completion:
    """The asyncio twin of :func:`chat` (``client`` from :func:`make_async_client`)."""
    attempt = 0
    while True:
        try:
            response = await client.chat.completions.create(**request)
        except (openai.APIConnectionError, openai.APIStatusError) as exc:
            await asyncio.sleep(retry.delay(attempt, exc))
            attempt += 1
        except ValueError as exc:  # a 200 whose body is not JSON
            raise CompletionError(f"malformed answer: {exc}") from exc
        else:
            return _completion(response)
