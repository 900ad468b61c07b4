"""Every failure is counted, and one bad request fails only itself.

A real runtime (tiny base, two adapters) serves on a loopback port from a thread; the
router (:func:`~lorafleet.serve.proxy.proxy_app`) runs in process in front of it. The
batcher's forward pass (:meth:`~lorafleet.engine.continuous.StepEngine.forward`) is
wrapped so that any pass holding a ``POISON`` request's row raises after the model ran,
as a CUDA error or an out-of-memory error would: the request that carries it must get a
500 (in its stream, too), its batch-mates their own answers, and every answer of either
server must appear in ``lorafleet_requests_total`` with its status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lorafleet.engine.generation import GenerationRequest
from lorafleet.rollout.sources import counters_from_text
from lorafleet.serve.auth import ApiKey, ApiKeys
from lorafleet.serve.metrics import UNKNOWN_MODEL, ServingMetrics
from lorafleet.serve.model import LorafleetRuntime, build_runtime
from lorafleet.serve.proxy import proxy_app
from lorafleet.serve.routes import Route, RouteTable
from lorafleet.serve.server import mount

in_module_loop = pytest.mark.asyncio(loop_scope="module")

POISON = "POISON"
SECRET = "sk-failures"
MAX_QUEUE = 8


def _text(request: GenerationRequest) -> str:
    return (request.prompt or "") + "".join(m["content"] for m in request.messages)


class PoisonedForward:
    """``StepEngine.forward`` that raises for any pass holding a poisoned request's row,
    after the model ran; it waits for :attr:`gate` and records each pass's prompts."""

    def __init__(self, forward) -> None:
        self.forward = forward
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[list[str]] = []

    def __call__(self, jobs, **inputs):
        self.gate.wait(10)
        prompts = [_text(job.request) for job in jobs]
        self.calls.append(prompts)
        logits = self.forward(jobs, **inputs)
        if any(POISON in prompt for prompt in prompts):
            raise RuntimeError("CUDA error: device-side assert triggered (simulated)")
        return logits


@contextlib.contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port; its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def served(
    tiny_base: Path, tiny_adapters: dict[str, Path]
) -> Iterator[tuple[LorafleetRuntime, PoisonedForward, str]]:
    runtime = build_runtime(
        tiny_base,
        {"stable": tiny_adapters["proposal-writer"], "canary": tiny_adapters["job-analyzer"]},
        max_wait_s=0.002,
        max_queue=MAX_QUEUE,
    )
    engine = runtime.batcher.engine
    poisoned = PoisonedForward(engine.forward)
    engine.forward = poisoned  # every forward pass of the runtime's batches
    app = FastAPI()
    mount(app, runtime, None)
    with serve_in_thread(app) as url:
        yield runtime, poisoned, url
    runtime.batcher.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def http(served) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=served[2], timeout=60) as client:
        yield client


def chat(model: str, content: str, stream: bool = False, max_tokens: int = 6) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


def counted(metrics_text: str) -> dict[tuple[str, str, str], float]:
    """``lorafleet_requests_total`` by (model, adapter, status)."""
    return {
        (s.labels["model"], s.labels["adapter"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(metrics_text)
        for s in family.samples
        if s.name == "lorafleet_requests_total"
    }


def increase(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


async def read_stream(response: httpx.Response) -> tuple[str, list[dict]]:
    """The text of a completion stream, and its error events."""
    text, errors = "", []
    async for line in response.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            errors.append(event["error"])
        else:
            text += event["choices"][0]["delta"].get("content", "")
    return text, errors


async def ask_stream(client: httpx.AsyncClient, body: dict) -> tuple[int, str, list[dict]]:
    async with client.stream("POST", "/openai/v1/chat/completions", json=body) as response:
        return (response.status_code, *await read_stream(response))


@in_module_loop
async def test_runtime_counts_every_status_it_answers(served, http) -> None:
    # Given a runtime with a route whose target is missing here (a replica lacking the
    # candidate) and an app with API keys in front of the same runtime
    runtime, poisoned, _ = served
    runtime.routes.set(
        "writer", Route.model_validate({"targets": [{"adapter": "gone", "weight": 1}]})
    )
    keyed = FastAPI()
    mount(keyed, runtime, None, ApiKeys([ApiKey("alice", SECRET, 100)]))
    before = counted((await http.get("/metrics")).text)
    # When each kind of answer is provoked
    answers = {
        "ok": await http.post("/openai/v1/chat/completions", json=chat("stable", "hi")),
        "bad body": await http.post("/openai/v1/chat/completions", json={"model": "stable"}),
        "unknown model": await http.post("/openai/v1/chat/completions", json=chat("nope", "hi")),
        "route target missing": await http.post(
            "/openai/v1/chat/completions", json=chat("writer", "hi")
        ),
        "organic 500": await http.post(
            "/openai/v1/chat/completions", json=chat("canary", f"{POISON} whole")
        ),
    }
    status, _, errors = await ask_stream(http, chat("canary", f"{POISON} streamed", stream=True))
    transport = httpx.ASGITransport(app=keyed)
    async with httpx.AsyncClient(transport=transport, base_url="http://keyed") as no_key:
        answers["no key"] = await no_key.post(
            "/openai/v1/chat/completions", json=chat("stable", "hi")
        )
    runtime.request_timeout_s = 0.001
    try:
        answers["timeout"] = await http.post(
            "/openai/v1/chat/completions", json=chat("stable", "slow")
        )
    finally:
        runtime.request_timeout_s = 120.0
    poisoned.gate.clear()  # the next forward pass waits: the queue fills up
    try:
        first = asyncio.create_task(
            http.post("/openai/v1/chat/completions", json=chat("stable", "a"))
        )
        await asyncio.sleep(0.3)  # admitted by the worker, which now waits at the gate
        queued = [
            asyncio.create_task(http.post("/openai/v1/chat/completions", json=chat("stable", q)))
            for q in "bcdefghi"[:MAX_QUEUE]
        ]
        await asyncio.sleep(0.3)
        answers["overloaded"] = await http.post(
            "/openai/v1/chat/completions", json=chat("stable", "j")
        )
    finally:
        poisoned.gate.set()
    assert [r.status_code for r in await asyncio.gather(first, *queued)] == [200] * (MAX_QUEUE + 1)
    # Then each answer has its status, and each status is counted under its labels
    assert {k: r.status_code for k, r in answers.items()} == {
        "ok": 200,
        "bad body": 400,
        "unknown model": 404,
        "route target missing": 404,
        "organic 500": 500,
        "no key": 401,
        "timeout": 503,
        "overloaded": 429,
    }
    assert answers["organic 500"].json()["error"]["code"] == "internal_error"
    assert "CUDA" not in answers["organic 500"].text  # the type only; the log has the rest
    assert status == 200 and [e["code"] for e in errors] == [500]  # failed after its 200
    unknown = (UNKNOWN_MODEL, UNKNOWN_MODEL)
    assert increase(before, counted((await http.get("/metrics")).text)) == {
        ("stable", "stable", "200"): MAX_QUEUE + 2,  # "ok", and all that waited at the gate
        (*unknown, "400"): 1,
        (*unknown, "404"): 1,
        ("writer", "gone", "404"): 1,  # the route's failure, where a canary looks
        ("canary", "canary", "500"): 2,  # whole and streamed
        (*unknown, "401"): 1,
        ("stable", "stable", "503"): 1,
        ("stable", "stable", "429"): 1,
    }
    runtime.routes.delete("writer")


@in_module_loop
async def test_one_bad_request_fails_only_itself(served, http) -> None:
    # Given what each request answers alone
    runtime, poisoned, _ = served
    mates = [
        chat(model, f"Write about {topic}.", stream=stream)
        for model, topic, stream in [
            ("stable", "bridges", False),
            ("canary", "rivers", True),
            ("base", "forests", False),
            ("stable", "deserts", True),
            ("canary", "oceans", False),
        ]
    ]
    alone = [
        (await http.post("/openai/v1/chat/completions", json={**m, "stream": False})).json()
        for m in mates
    ]
    expected = [a["choices"][0]["message"]["content"] for a in alone]
    assert all(expected)

    async def ask(body: dict) -> tuple[int, str]:
        if body["stream"]:
            status, text, errors = await ask_stream(http, body)
            return (500 if errors else status), text
        response = await http.post("/openai/v1/chat/completions", json=body)
        ok = response.status_code == 200
        return response.status_code, response.json()["choices"][0]["message"][
            "content"
        ] if ok else ""

    # When they arrive together with a poisoned one and share its forward passes (the
    # worker is held between two steps until all of them wait)
    poisoned.calls.clear()
    release = threading.Event()
    busy = asyncio.ensure_future(runtime.batcher.run_exclusive(release.wait, 30))
    try:
        asks = [
            asyncio.ensure_future(ask(b)) for b in [*mates, chat("canary", POISON, stream=True)]
        ]
        for _ in range(300):
            if runtime.batcher.queue_depth == len(asks):
                break
            await asyncio.sleep(0.01)
    finally:
        release.set()
    await busy
    answers = await asyncio.gather(*asks)
    shared = [call for call in poisoned.calls if any(POISON in p for p in call) and len(call) > 1]
    assert shared and len(shared[0]) == len(mates) + 1, poisoned.calls  # they did share it
    # Then only the poisoned one fails, and every mate gets its own answer, streamed once
    assert answers[-1][0] == 500
    assert answers[:-1] == [(200, text) for text in expected]


async def broken_stream() -> AsyncIterator[str]:
    yield 'data: {"choices": [{"index": 0, "delta": {"content": "Hel"}}]}\n\n'
    raise RuntimeError("the upstream died mid-stream")


@pytest.fixture(scope="module")
def broken_upstream() -> Iterator[str]:
    """An upstream whose streams break off after one event."""
    app = FastAPI()

    @app.post("/openai/v1/chat/completions")
    async def complete() -> StreamingResponse:
        return StreamingResponse(broken_stream(), media_type="text/event-stream")

    with serve_in_thread(app) as url:
        yield url


@in_module_loop
async def test_router_counts_every_status_it_answers(served, broken_upstream) -> None:
    # Given the router in front of the runtime, with a route whose candidate one replica lacks
    _, _, url = served
    table = RouteTable(
        {"writer": Route.model_validate({"targets": [{"adapter": "gone", "weight": 1}]})}
    )
    metrics = ServingMetrics()
    keys = ApiKeys([ApiKey("alice", SECRET, 100)])
    apps = {
        "open": proxy_app(url, table, metrics=metrics),
        "keyed": proxy_app(url, table, metrics=metrics, api_keys=keys),
        "broken": proxy_app(broken_upstream, RouteTable(), metrics=metrics),
        "down": proxy_app("http://127.0.0.1:9", RouteTable(), metrics=metrics),
    }
    clients = {
        name: httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router")
        for name, app in apps.items()
    }
    path = "/openai/v1/chat/completions"

    def failing_resolve(model, headers):
        raise RuntimeError("a bug in the router")

    # When each kind of answer is provoked
    async with contextlib.AsyncExitStack() as stack:
        for client in clients.values():
            await stack.enter_async_context(client)
        statuses = {
            "ok": (await clients["open"].post(path, json=chat("stable", "hi"))).status_code,
            "bad body": (await clients["open"].post(path, content=b"[")).status_code,
            "no key": (await clients["keyed"].post(path, json=chat("stable", "hi"))).status_code,
            "candidate missing": (
                await clients["open"].post(path, json=chat("writer", "hi"))
            ).status_code,
            "upstream 500": (
                await clients["open"].post(path, json=chat("canary", POISON))
            ).status_code,
            "down": (await clients["down"].post(path, json=chat("stable", "hi"))).status_code,
        }
        streamed = await ask_stream(clients["open"], chat("canary", POISON, stream=True))
        broken = await ask_stream(clients["broken"], chat("m", "hi", stream=True))
        faulty_table = RouteTable()
        faulty_table.resolve = failing_resolve  # a fault of the router itself
        faulty = proxy_app(url, faulty_table, metrics=metrics)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=faulty), base_url="http://router"
        ) as client:
            statuses["router bug"] = (
                await client.post(path, json=chat("stable", "hi"))
            ).status_code
    # Then each answer has its status and is counted under it
    assert statuses == {
        "ok": 200,
        "bad body": 400,
        "no key": 401,
        "candidate missing": 404,
        "upstream 500": 500,
        "down": 503,
        "router bug": 500,
    }
    assert streamed[0] == 200 and [e["code"] for e in streamed[2]] == [500]
    assert broken[0] == 200 and broken[1] == "Hel" and [e["code"] for e in broken[2]] == [502]
    exposition = generate_latest(metrics.registry).decode()
    unknown = (UNKNOWN_MODEL, UNKNOWN_MODEL)
    assert counted(exposition) == {
        ("stable", "stable", "200"): 1,
        (*unknown, "400"): 1,
        (*unknown, "401"): 1,
        ("writer", "gone", "404"): 1,
        ("canary", "canary", "500"): 2,  # whole, and the stream's error event
        ("m", "m", "502"): 1,
        (*unknown, "503"): 1,
        (*unknown, "500"): 1,
    }
    # And a canary reading the router sees the missing candidate as a failure
    versions = counters_from_text(exposition, "writer", ["stable", "gone"], judge_metric=None)
    assert versions["gone"]["requests"] == 1 and versions["gone"]["errors"] == 1
