"""The router over a Unix socket, the vLLM front's way to vLLM.

The upstream here is a real HTTP/1.1 server on a real Unix socket (a few lines of asyncio
that speak keep-alive, as vLLM's uvicorn does); the router (:func:`proxy_app`) is called
in process through ``httpx.ASGITransport``. Over the socket the router reuses its
connections, and a request that meets a connection the upstream closes as it arrives (the
upstream's idle timeout running out at that moment) is sent again on a new one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from lorafleet.serve.metrics import ServingMetrics
from lorafleet.serve.proxy import proxy_app
from lorafleet.serve.routes import RouteTable


@dataclass
class SocketUpstream:
    """Chat completions on a Unix socket, keep-alive; with ``drop_second``, every
    connection's second request is read and the connection closed unanswered."""

    path: Path
    drop_second: bool = False
    connections: int = 0
    answered: list[str] = field(default_factory=list)
    dropped: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = json.loads(await reader.readexactly(length))
                if self.drop_second and served == 1:
                    self.dropped += 1
                    return
                served += 1
                self.answered.append(body["model"])
                writer.write(self._answer(body))
                await writer.drain()
        except asyncio.IncompleteReadError:
            return  # the client closed the connection
        finally:
            writer.close()

    @staticmethod
    def _answer(body: dict) -> bytes:
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        if body.get("stream"):
            events = [
                {"choices": [{"index": 0, "delta": {"content": word}}]} for word in ("a", "b")
            ]
            chunks = [f"data: {json.dumps(e)}\n\n" for e in [*events, {"usage": usage}]]
            chunks.append("data: [DONE]\n\n")
            framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c.encode()) for c in chunks)
            head = b"content-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
            return b"HTTP/1.1 200 OK\r\n" + head + b"\r\n" + framed + b"0\r\n\r\n"
        content = json.dumps({"model": body["model"], "choices": [], "usage": usage}).encode()
        head = f"content-type: application/json\r\ncontent-length: {len(content)}\r\n"
        return b"HTTP/1.1 200 OK\r\n" + head.encode() + b"\r\n" + content


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[SocketUpstream]:
    fake = SocketUpstream(tmp_path / "vllm.sock")
    server = await asyncio.start_unix_server(fake.handle, str(fake.path))
    async with server:
        yield fake


async def _router(upstream: SocketUpstream, metrics: ServingMetrics):
    app = proxy_app(
        "http://vllm", RouteTable(), metrics=metrics, upstream_prefix="/v1",
        upstream_uds=str(upstream.path),
    )  # fmt: skip
    return app, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r")


def _count(metrics: ServingMetrics, status: int) -> float:
    value = metrics.registry.get_sample_value(
        "lorafleet_requests_total", {"model": "m", "adapter": "m", "status": str(status)}
    )
    return value or 0.0


async def _ask(client: httpx.AsyncClient, stream: bool = False) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return await client.post("/openai/v1/chat/completions", json=body)


async def test_connections_to_the_socket_are_reused(upstream: SocketUpstream) -> None:
    metrics = ServingMetrics()
    app, client = await _router(upstream, metrics)
    async with app.router.lifespan_context(app), client:
        answers = [await _ask(client, stream=i % 2 == 1) for i in range(6)]
    assert [a.status_code for a in answers] == [200] * 6
    assert answers[1].text.count("data: ") == 4 and answers[1].text.endswith("[DONE]\n\n")
    assert answers[0].json()["usage"]["completion_tokens"] == 2
    assert upstream.answered == ["m"] * 6 and upstream.connections == 1
    assert _count(metrics, 200) == 6


async def test_a_request_that_meets_a_closing_connection_is_sent_again(
    upstream: SocketUpstream,
) -> None:
    upstream.drop_second = True  # the upstream closes each connection as its 2nd request comes
    metrics = ServingMetrics()
    app, client = await _router(upstream, metrics)
    async with app.router.lifespan_context(app), client:
        answers = [await _ask(client, stream=i == 2) for i in range(4)]
    assert [a.status_code for a in answers] == [200] * 4
    assert answers[2].text.endswith("data: [DONE]\n\n")
    # Every request after the first met a dropped connection once and was answered on a
    # new one; none was answered twice.
    assert upstream.dropped == 3 and upstream.connections == 4
    assert upstream.answered == ["m"] * 4
    assert _count(metrics, 200) == 4 and _count(metrics, 503) == 0
