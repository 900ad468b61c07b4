"""API keys and per-key rate limits of the OpenAI routes, in the runtime and the router.

The official ``openai`` client talks to the apps in process (``httpx.ASGITransport``): a
runtime that is not loaded still answers ``/openai/v1/models``, which is all the key
checks need; the router forwards to the scripted upstream of ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI
from prometheus_client import generate_latest

from lorafleet.errors import LorafleetError
from lorafleet.serve.auth import ApiKey, ApiKeys
from lorafleet.serve.metrics import ServingMetrics
from lorafleet.serve.model import LorafleetRuntime
from lorafleet.serve.proxy import proxy_app
from lorafleet.serve.routes import RouteTable
from lorafleet.serve.server import mount

SECRET = "sk-alice-0123456789"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def keys(rpm: int = 100, clock: Callable[[], float] | None = None) -> ApiKeys:
    return ApiKeys([ApiKey("alice", SECRET, rpm), ApiKey("bob", "sk-bob", rpm)], clock or Clock())


def client(app: FastAPI, key: str) -> openai.AsyncOpenAI:
    transport = httpx.ASGITransport(app=app)
    return openai.AsyncOpenAI(
        base_url="http://app/openai/v1",
        api_key=key,
        max_retries=0,
        http_client=httpx.AsyncClient(transport=transport, base_url="http://app"),
    )


@pytest.fixture
def runtime(tiny_base: Path) -> LorafleetRuntime:
    return LorafleetRuntime("base", tiny_base, {})  # no load(): routes only


def runtime_app(runtime: LorafleetRuntime, api_keys: ApiKeys | None) -> FastAPI:
    app = FastAPI()
    mount(app, runtime, None, api_keys)
    return app


@pytest.fixture
async def router(openai_stub) -> AsyncIterator[tuple[FastAPI, ServingMetrics]]:
    metrics = ServingMetrics()
    app = proxy_app(openai_stub.root, RouteTable(), metrics=metrics, api_keys=keys(rpm=2))
    yield app, metrics


async def test_runtime_needs_a_known_key(runtime: LorafleetRuntime) -> None:
    app = runtime_app(runtime, keys())
    async with client(app, SECRET) as good:
        assert [m.id for m in (await good.models.list()).data] == ["base"]
    async with client(app, "sk-wrong") as wrong:
        with pytest.raises(openai.AuthenticationError) as error:
            await wrong.models.list()
    assert error.value.status_code == 401
    assert error.value.body["code"] == "invalid_api_key"
    assert SECRET not in str(error.value.body) and "sk-wrong" not in str(error.value.body)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as raw:
        missing = await raw.post("/openai/v1/completions", json={"model": "base", "prompt": "x"})
        # health stays open to the probes
        assert (await raw.get("/v2/health/live")).status_code == 200
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["type"] == "invalid_request_error"
    rejected = generate_latest(runtime.metrics.registry).decode()
    assert 'lorafleet_auth_rejections_total{reason="invalid_key"} 1.0' in rejected
    assert 'lorafleet_auth_rejections_total{reason="missing_key"} 1.0' in rejected
    assert SECRET not in rejected


async def test_runtime_without_keys_is_open(runtime: LorafleetRuntime) -> None:
    async with client(runtime_app(runtime, None), "anything") as anyone:
        assert [m.id for m in (await anyone.models.list()).data] == ["base"]


async def test_each_key_has_its_own_rate(runtime: LorafleetRuntime) -> None:
    clock = Clock()
    app = runtime_app(runtime, keys(rpm=2, clock=clock))
    async with client(app, SECRET) as alice, client(app, "sk-bob") as bob:
        await alice.models.list()
        await alice.models.list()
        with pytest.raises(openai.RateLimitError) as error:
            await alice.models.list()
        await bob.models.list()  # bob's bucket is his own
        clock.now += 30  # 2 per minute: one request back after 30 s
        await alice.models.list()
    assert error.value.status_code == 429
    assert error.value.response.headers["retry-after"] == "30"
    assert error.value.body["code"] == "rate_limit_exceeded"
    assert "'alice'" in error.value.body["message"] and SECRET not in error.value.body["message"]
    text = generate_latest(runtime.metrics.registry).decode()
    assert 'lorafleet_auth_rejections_total{reason="rate_limited"} 1.0' in text


async def test_router_checks_keys_and_forwards_them(router, openai_stub) -> None:
    app, metrics = router
    async with client(app, "sk-wrong") as wrong:
        with pytest.raises(openai.AuthenticationError):
            await wrong.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
    assert openai_stub.requests == []  # refused before the upstream saw it
    async with client(app, SECRET) as alice:
        for _ in range(2):
            await alice.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
        with pytest.raises(openai.RateLimitError):
            await alice.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
    assert [r["authorization"] for r in openai_stub.requests] == [f"Bearer {SECRET}"] * 2
    text = generate_latest(metrics.registry).decode()
    assert 'lorafleet_auth_rejections_total{reason="invalid_key"} 1.0' in text
    assert 'lorafleet_auth_rejections_total{reason="rate_limited"} 1.0' in text


def test_keys_file_format(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# clients\nalice:sk-a\n\nbob:sk-b:30\n")
    loaded = ApiKeys.from_file(path, default_rpm=7)
    assert loaded.names == ["alice", "bob"]
    assert "sk-a" not in repr(loaded._keys)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("just-a-key\n", r"keys:1: expected NAME:KEY or NAME:KEY:RPM"),
        ("alice:sk-a:lots\n", r"keys:1: RPM must be a whole number"),
        ("al ice:sk-a\n", r"keys:1: key name 'al ice' must match"),
        ("a:sk-1\nb:sk-1\n", r"keys: API key names and keys must each be unique"),
        ("# nothing\n", r"keys: no API keys"),
    ],
)
def test_bad_keys_files_name_file_and_line_but_not_the_key(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(LorafleetError, match=problem) as error:
        ApiKeys.from_file(path)
    assert "sk-" not in str(error.value)
