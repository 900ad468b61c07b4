"""Eight adapters on one real server (loopback): a bounded load test, KServe health, client
disconnects, and the standalone router proxy in front of it, driven by the ``openai`` client.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from lorafleet.serve.runtime import run_server_subprocess, wait_ready

from .conftest import make_adapter

pytestmark = pytest.mark.integration

TOKEN = "fleet-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
REQUESTS, CONCURRENCY, MAX_TOKENS = 1000, 64, 3


def chat(model: str, content: str, max_tokens: int = MAX_TOKENS) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }


@pytest.fixture(scope="module")
def server(tiny_base: Path, fleet_adapters: dict[str, Path]) -> Iterator[str]:
    args = ["--max-batch-size", "16", "--max-queue", "48", "--request-timeout", "30"]
    with run_server_subprocess(
        tiny_base, fleet_adapters, extra_args=args, env={"LORAFLEET_ADMIN_TOKEN": TOKEN}
    ) as url:
        yield url


def test_kserve_health_and_readiness(server: str) -> None:
    with httpx.Client(base_url=server, timeout=10) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/v2/models/base/ready").status_code == 200
        assert client.get("/v1/models/base").json()["ready"] is True
        assert client.get("/v2/models/no-such/ready").status_code == 404


async def test_load_with_a_bad_adapter_loaded_mid_traffic(
    server: str, tiny_base: Path, tmp_path: Path, fleet_adapters: dict[str, Path]
) -> None:
    noop = make_adapter(tiny_base, tmp_path / "untrained", seed=1, init_random=False)
    names = sorted(fleet_adapters)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=server, timeout=60, limits=limits) as client:
        reference = await client.post("/openai/v1/chat/completions", json=chat("expert-3", "ref"))
        assert reference.status_code == 200
        gate = asyncio.Semaphore(CONCURRENCY)
        done = asyncio.Event()
        finished = 0

        async def one(i: int) -> httpx.Response:
            nonlocal finished
            async with gate:
                body = chat(names[i % len(names)], f"Request {i}: write a proposal.")
                response = await client.post("/openai/v1/chat/completions", json=body)
            finished += 1
            if finished == REQUESTS // 3:
                done.set()
            return response

        async def load_bad_adapter() -> httpx.Response:
            await done.wait()
            return await client.put(
                "/admin/adapters/expert-3", json={"source": str(noop)}, headers=AUTH
            )

        # When 1,000 requests run 64 at a time, and a no-op adapter replaces expert-3 at 1/3
        *responses, admin = await asyncio.gather(
            *(one(i) for i in range(REQUESTS)), load_bad_adapter()
        )
        statuses = Counter(r.status_code for r in responses)
        # Then every request got an answer, 200 or an explicit back-off
        assert set(statuses) <= {200, 429, 503}, statuses
        assert statuses[200] >= REQUESTS // 2, statuses
        for r in responses:
            if r.status_code != 200:
                assert "retry-after" in r.headers
        # And the bad adapter was refused with its reason while expert-3 kept serving
        assert admin.status_code == 422 and admin.json()["error"]["code"] == "no_effect"
        after = await client.post("/openai/v1/chat/completions", json=chat("expert-3", "ref"))
        assert after.json()["choices"] == reference.json()["choices"]
        assert (await client.get("/v2/health/ready")).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert (
            'lorafleet_requests_total{adapter="expert-7",model="expert-7",status="200"}' in metrics
        )
        assert "lorafleet_queue_depth" in metrics


def test_disconnected_stream_is_cancelled(server: str) -> None:
    body = {**chat("expert-1", "Write a long proposal.", max_tokens=400), "stream": True}
    with httpx.Client(base_url=server, timeout=30) as client:
        with client.stream("POST", "/openai/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            first = next(response.iter_lines())
            assert first.startswith("data: ")
        # The client hung up after one event: the server records it as 499 (client closed)
        for _ in range(50):
            metrics = client.get("/metrics").text
            if 'model="expert-1",status="499"' in metrics:
                break
            asyncio.run(asyncio.sleep(0.1))
        assert (
            'lorafleet_requests_total{adapter="expert-1",model="expert-1",status="499"}' in metrics
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def proxy(server: str) -> Iterator[str]:
    """The standalone router (``python -m lorafleet.serve.router``) in front of ``server``."""
    port = _free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as routes:
        routes.write(
            '{"routes": {"proposal-writer": {"targets": [{"adapter": "expert-0", "weight": 1}]}}}'
        )
    cmd = [sys.executable, "-m", "lorafleet.serve.router", "--upstream", server]
    cmd += ["--routes", routes.name, "--port", str(port)]
    env = {**os.environ, "LORAFLEET_ADMIN_TOKEN": TOKEN}
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 60, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=15)
        os.unlink(routes.name)


def test_proxy_routes_by_weight_for_the_openai_client(proxy: str, server: str) -> None:
    with (
        openai.OpenAI(base_url=f"{proxy}/openai/v1", api_key="x", max_retries=0) as via_proxy,
        openai.OpenAI(base_url=f"{server}/openai/v1", api_key="x", max_retries=0) as direct,
        httpx.Client(base_url=proxy, timeout=10) as admin,
    ):

        def ask(client: openai.OpenAI, model: str) -> str:
            reply = client.chat.completions.create(**chat(model, "Write a proposal.", 6))
            return reply.choices[0].message.content

        # The route file sends everything to expert-0
        assert ask(via_proxy, "proposal-writer") == ask(direct, "expert-0")
        ids = {m.id for m in via_proxy.models.list()}
        assert {"proposal-writer", "base", "expert-0"} <= ids
        # A canary controller moves all traffic to expert-5
        route = {
            "targets": [{"adapter": "expert-0", "weight": 0}, {"adapter": "expert-5", "weight": 1}]
        }
        assert admin.put("/admin/routes/proposal-writer", json=route).status_code == 401
        assert admin.put("/admin/routes/proposal-writer", json=route, headers=AUTH).is_success
        assert ask(via_proxy, "proposal-writer") == ask(direct, "expert-5")
        # Streams pass through whole
        stream = via_proxy.chat.completions.create(
            **chat("proposal-writer", "Write a proposal.", 6), stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == ask(direct, "expert-5")
        # A stream is counted once the proxy has relayed its end, which may be just after the
        # client read it: wait for the count (a few ms), do not race it.
        counted = (
            'lorafleet_requests_total{adapter="expert-5",model="proposal-writer",status="200"} 2.0'
        )
        deadline = time.monotonic() + 5
        while counted not in (metrics := admin.get("/metrics").text):
            assert time.monotonic() < deadline, metrics
            time.sleep(0.05)


def test_proxy_keeps_unknown_model_strings_out_of_its_metric_labels(proxy: str) -> None:
    with (
        openai.OpenAI(base_url=f"{proxy}/openai/v1", api_key="x", max_retries=0) as client,
        httpx.Client(base_url=proxy, timeout=10) as admin,
    ):
        for i in range(3):
            with pytest.raises(openai.NotFoundError):
                client.chat.completions.create(**chat(f"invented-{i}", "hi", 2))
        # a body the upstream refuses (400) before it looks the name up
        bad = admin.post(
            "/openai/v1/chat/completions", json={"model": "invented-bad", "messages": "hi"}
        )
        assert bad.status_code == 400, bad.text
        metrics = admin.get("/metrics").text
    assert "invented-" not in metrics
    assert 'lorafleet_requests_total{adapter="_unknown",model="_unknown",status="404"}' in metrics
