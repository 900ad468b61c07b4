"""The project's OpenAI client: key rules, capped retries and malformed answers, against a
real local HTTP server (the ``openai_stub`` fixture), through the real ``openai`` package."""

from __future__ import annotations

import email.utils
import logging
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lorafleet.errors import LorafleetError
from lorafleet.llm import (
    PLACEHOLDER_KEY,
    ApiKeyError,
    CompletionError,
    RetryPolicy,
    chat,
    chat_async,
    make_async_client,
    make_client,
    resolve_api_key,
)

HI = [{"role": "user", "content": "hi"}]
FAST = RetryPolicy(max_retries=2, backoff_s=0.01, max_delay_s=0.2)


def test_the_key_comes_from_the_secret_file_else_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LF_TEST_KEY", "from-env")
    assert resolve_api_key("synthesis.teacher", env="LF_TEST_KEY") == "from-env"
    secret = tmp_path / "api-key"
    secret.write_text("from-secret\n")
    assert resolve_api_key("synthesis.teacher", "LF_TEST_KEY", secret) == "from-secret"
    assert resolve_api_key("synthesis.teacher") is None  # no source: a server without keys


@pytest.mark.parametrize(
    ("env", "file", "message"),
    [
        (
            "LF_TEST_MISSING_KEY",
            None,
            "gate.judge.api_key_env: environment variable LF_TEST_MISSING_KEY is not set or empty "
            "(set it, or set api_key_env to null for a server that needs no key)",
        ),
        ("LF_TEST_EMPTY_KEY", None, "environment variable LF_TEST_EMPTY_KEY is not set or empty"),
        (None, "missing", "gate.judge.api_key_file: cannot read {dir}/missing: No such file"),
        (None, "empty", "gate.judge.api_key_file: {dir}/empty is empty"),
    ],
)
def test_a_named_key_source_that_is_missing_is_one_line(
    env: str | None,
    file: str | None,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LF_TEST_MISSING_KEY", raising=False)
    monkeypatch.setenv("LF_TEST_EMPTY_KEY", "  ")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ApiKeyError) as caught:
        resolve_api_key("gate.judge", env, tmp_path / file if file else None)
    assert isinstance(caught.value, LorafleetError)  # the CLI prints one line, exits 2
    assert message.format(dir=tmp_path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_key_is_sent_and_without_a_source_only_the_placeholder(
    openai_stub, monkeypatch: pytest.MonkeyPatch
) -> None:
    with make_client(openai_stub.url, "s3cret", timeout_s=5) as client:
        assert chat(client, FAST, model="m", messages=HI).text == "[[A]]"
    # A hosted API's key in the environment never goes to a server configured without keys.
    monkeypatch.setenv("OPENAI_API_KEY", "hosted-key")
    with make_client(openai_stub.url, None, timeout_s=5) as client:
        chat(client, FAST, model="m", messages=HI)
    assert [r["authorization"] for r in openai_stub.requests] == [
        "Bearer s3cret",
        f"Bearer {PLACEHOLDER_KEY}",
    ]
    assert openai_stub.requests[0]["path"] == "/v1/chat/completions"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_a_huge_retry_after_is_capped(
    openai_stub, caplog: pytest.LogCaptureFixture, form: str
) -> None:
    # Given a server that asks for an hour's pause once (in seconds, or as an HTTP date made
    # now: one made when the tests are collected would have shrunk by the time this runs)
    retry_after = (
        "3600"
        if form == "seconds"
        else email.utils.format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    )
    openai_stub.script = [(429, {"error": {"message": "slow down"}}, {"retry-after": retry_after})]
    start = time.monotonic()
    # When a client with a cap of 0.2 s asks
    with (
        caplog.at_level(logging.INFO, logger="lorafleet"),
        make_client(openai_stub.url, None, timeout_s=5) as client,
    ):
        answer = chat(client, FAST, model="judge", messages=HI)
    # Then it waits the cap, not the hour, and the second attempt answers
    assert answer.text == "[[A]]" and answer.model == "judge"
    assert time.monotonic() - start < 5
    assert len(openai_stub.requests) == 2
    assert "HTTP 429" in caplog.text
    assert re.search(r"retry 1 of 2 in 0\.2s \(Retry-After 3[56]\d\ds capped\)", caplog.text)


def test_a_refusal_is_not_retried_and_retries_run_out(openai_stub) -> None:
    openai_stub.script = [(404, {"error": {"message": "no such model"}}, {})]
    with make_client(openai_stub.url, None, timeout_s=5) as client:
        with pytest.raises(CompletionError, match=r"^HTTP 404: .*no such model") as refused:
            chat(client, FAST, model="m", messages=HI)
        assert refused.value.status == 404 and len(openai_stub.requests) == 1
        openai_stub.script = [(503, {"error": {"message": "busy"}}, {})] * 3
        with pytest.raises(CompletionError, match=r"^gave up after 3 attempts: HTTP 503") as out:
            chat(client, FAST, model="m", messages=HI)
        assert out.value.status == 503 and len(openai_stub.requests) == 4


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"choices": []}, "malformed answer: no choices"),
        ({"id": "x"}, "malformed answer: no choices"),
        ({"choices": [{"index": 0}]}, "malformed answer: the first choice has no message text"),
        ({"choices": [{"message": {"content": 5}}]}, "the first choice has no message text"),
        ("not json {", "malformed answer: "),
    ],
)
def test_a_malformed_200_is_a_failed_request_not_a_crash(
    openai_stub, body: object, reason: str
) -> None:
    openai_stub.script = [(200, body, {})]
    with (
        make_client(openai_stub.url, None, timeout_s=5) as client,
        pytest.raises(CompletionError, match=reason) as caught,
    ):
        chat(client, FAST, model="m", messages=HI)
    assert caught.value.status is None
    assert len(openai_stub.requests) == 1  # the server answered: not retried


async def test_the_async_client_retries_the_same_way(openai_stub) -> None:
    openai_stub.script = [(502, "bad gateway", {}), (429, {}, {"retry-after": "0"})]
    async with make_async_client(openai_stub.url, "k", timeout_s=5) as client:
        answer = await chat_async(client, FAST, model="m", messages=HI, max_tokens=4)
    assert answer.text == "[[A]]" and len(openai_stub.requests) == 3
    assert openai_stub.requests[-1]["body"]["max_tokens"] == 4
