"""Fault injection for canary drills, on a real runtime driven over ASGI.

A real runtime (tiny base, the two session adapters) is mounted on a bare FastAPI app:
faults are off until set through the admin API (bearer token) or ``--fault``, hit only
the adapter they name, and are counted in the metrics like real failures.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from lorafleet.errors import LorafleetError
from lorafleet.serve.faults import Fault, FaultTable, parse_fault
from lorafleet.serve.model import LorafleetRuntime, build_runtime
from lorafleet.serve.server import mount

in_module_loop = pytest.mark.asyncio(loop_scope="module")

TOKEN = "drill-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def served(
    tiny_base: Path, tiny_adapters: dict[str, Path]
) -> AsyncIterator[tuple[LorafleetRuntime, httpx.AsyncClient]]:
    runtime = build_runtime(
        tiny_base,
        {"stable": tiny_adapters["proposal-writer"], "canary": tiny_adapters["job-analyzer"]},
        max_wait_s=0.002,
        faults=FaultTable(seed=3),
    )
    app = FastAPI()
    mount(app, runtime, TOKEN)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://runtime"
    ) as client:
        yield runtime, client
    runtime.batcher.close()


async def _ask(client: httpx.AsyncClient, model: str) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Write a proposal."}],
        "max_tokens": 2,
    }
    return await client.post("/openai/v1/chat/completions", json=body)


@in_module_loop
async def test_faults_need_the_token_and_hit_only_the_named_adapter(served) -> None:
    runtime, client = served
    assert (await client.put("/admin/faults/canary", json={"error_rate": 1.0})).status_code == 401
    assert (await client.get("/admin/faults", headers=AUTH)).json() == {
        "faults": {}
    }  # off by default
    put = await client.put("/admin/faults/canary", json={"error_rate": 0.3}, headers=AUTH)
    assert put.status_code == 200 and put.json() == {
        "error_rate": 0.3,
        "added_latency_ms": 0.0,
        "status": 500,
    }
    canary = Counter([(await _ask(client, "canary")).status_code for _ in range(40)])
    stable = Counter([(await _ask(client, "stable")).status_code for _ in range(10)])
    assert stable == {200: 10}
    assert (
        set(canary) == {200, 500} and 4 <= canary[500] <= 22
    )  # Binomial(40, 0.3): mean 12, sd 2.9
    failed = await _ask(client, "canary")
    while failed.status_code != 500:
        failed = await _ask(client, "canary")
    assert failed.json()["error"]["code"] == "injected_fault"
    assert failed.headers["x-lorafleet-adapter"] == "canary"
    counted = runtime.metrics.registry.get_sample_value(
        "lorafleet_requests_total", {"model": "canary", "adapter": "canary", "status": "500"}
    )
    assert counted is not None and counted >= canary[500] + 1
    assert (await client.delete("/admin/faults/canary", headers=AUTH)).status_code == 200
    assert Counter([(await _ask(client, "canary")).status_code for _ in range(10)]) == {200: 10}
    assert (await client.delete("/admin/faults/canary", headers=AUTH)).status_code == 404


@in_module_loop
async def test_added_latency_slows_only_the_named_adapter(served) -> None:
    _, client = served
    await client.put("/admin/faults/canary", json={"added_latency_ms": 300}, headers=AUTH)
    try:
        start = time.perf_counter()
        assert (await _ask(client, "canary")).status_code == 200
        slow = time.perf_counter() - start
        start = time.perf_counter()
        assert (await _ask(client, "stable")).status_code == 200
        fast = time.perf_counter() - start
    finally:
        await client.delete("/admin/faults/canary", headers=AUTH)
    assert slow >= 0.3 and fast < 0.3


@in_module_loop
async def test_bad_fault_bodies_are_refused(served) -> None:
    _, client = served
    bad = await client.put("/admin/faults/canary", json={"error_rate": 2}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["error"]["message"].startswith("error_rate:")
    assert (
        await client.put("/admin/faults/canary", json={"status": 404}, headers=AUTH)
    ).status_code == 422


def test_fault_option_parses_and_names_mistakes() -> None:
    assert parse_fault("writer-v2:error_rate=0.3,added_latency_ms=500") == (
        "writer-v2",
        Fault(error_rate=0.3, added_latency_ms=500),
    )
    with pytest.raises(
        LorafleetError, match=r"^--fault 'w:error_rat=1': 'error_rat=1': keys are error_rate"
    ):
        parse_fault("w:error_rat=1")
    with pytest.raises(
        LorafleetError, match=r"^--fault 'w:error_rate=3': error_rate: Input should be less"
    ):
        parse_fault("w:error_rate=3")
    with pytest.raises(LorafleetError, match=r"^--fault 'w': expected NAME:KEY=VALUE"):
        parse_fault("w")
    with pytest.raises(LorafleetError, match=r"^--fault 'a/b:error_rate=1': names match"):
        parse_fault("a/b:error_rate=1")
