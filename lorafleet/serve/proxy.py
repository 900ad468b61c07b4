"""The standalone router: an OpenAI-compatible proxy that applies a route table.

:func:`proxy_app` sits in front of any OpenAI-compatible upstream (the lorafleet runtime
or vLLM), deployed as a KServe transformer. Each request's ``model`` is resolved through
a :class:`~lorafleet.serve.routes.RouteTable` (weighted, optionally sticky) before it is
forwarded; ``/admin/routes`` changes the weights at runtime (bearer token).

Run it with ``lorafleet router --upstream URL [--routes FILE]`` or, as the transformer
container does, ``python -m lorafleet.serve.router``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lorafleet.serve.metrics import UNKNOWN_MODEL, ServingMetrics
from lorafleet.serve.routes import RouteTable, routes_admin_router

__all__ = ["proxy_app"]


def _usage(body: bytes) -> tuple[int, int]:
    try:
        usage = json.loads(body).get("usage") or {}
    except (ValueError, AttributeError):
        return 0, 0
    return int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))


class _ProxyHandlers:
    """The proxy's route handlers; every upstream call goes through one client.

    Args:
        client: the upstream's client (its ``base_url`` is the upstream).
        table: the routes.
        metrics: where to count.
    """

    def __init__(self, client: httpx.AsyncClient, table: RouteTable, metrics: ServingMetrics):
        self.client, self.table, self.metrics = client, table, metrics

    async def chat_completions(self, request: Request) -> Response:
        """``POST /openai/v1/chat/completions``."""
        return await self.forward(request, "/openai/v1/chat/completions")

    async def completions(self, request: Request) -> Response:
        """``POST /openai/v1/completions``."""
        return await self.forward(request, "/openai/v1/completions")

    async def forward(self, request: Request, path: str) -> Response:
        """Send a completion request to its route's adapter; streams are relayed as they come."""
        start = time.perf_counter()
        try:
            body = json.loads(await request.body())
            model = body["model"]
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": {"message": "body: a JSON object with 'model'"}}, 400)
        adapter = self.table.resolve(model, request.headers)
        body["model"] = adapter
        upstream_request = self.client.build_request("POST", path, json=body)
        try:
            response = await self.client.send(upstream_request, stream=True)
        except httpx.TransportError as exc:
            self.metrics.observe(model, adapter, 503, time.perf_counter() - start)
            return JSONResponse({"error": {"message": f"upstream unreachable: {exc}"}}, 503)
        headers = {"x-lorafleet-adapter": adapter}
        for name in ("content-type", "retry-after"):
            if name in response.headers:
                headers[name] = response.headers[name]
        if body.get("stream"):
            relay = self._relay(response, model, adapter, start)
            return StreamingResponse(relay, response.status_code, headers)
        if response.status_code == 404 and model not in self.table:
            # the upstream serves no such model: keep the client's string out of the labels
            model = adapter = UNKNOWN_MODEL
        content = await response.aread()
        await response.aclose()
        self.metrics.observe(
            model, adapter, response.status_code, time.perf_counter() - start, *_usage(content)
        )
        return Response(content, response.status_code, headers)

    async def _relay(
        self, response: httpx.Response, model: str, adapter: str, start: float
    ) -> AsyncIterator[bytes]:
        """The upstream's stream, chunk by chunk; counted once it ends or the client leaves."""
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        finally:
            await response.aclose()
            self.metrics.observe(model, adapter, response.status_code, time.perf_counter() - start)

    async def models(self) -> Response:
        """``GET /openai/v1/models``: the routes (``parent`` = first target), then the upstream's."""
        response = await self.client.get("/openai/v1/models")
        if response.status_code != 200:
            return Response(response.content, response.status_code)
        listing = response.json()
        routes = [
            {
                "id": name,
                "object": "model",
                "owned_by": "lorafleet-router",
                "root": name,
                "parent": route["targets"][0]["adapter"],
            }
            for name, route in self.table.as_dict().items()
        ]
        return JSONResponse({"object": "list", "data": routes + listing.get("data", [])})

    async def scrape(self) -> Response:
        """``GET /metrics``: the proxy's own counters, Prometheus text format."""
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def live(self) -> dict:
        """``GET /v2/health/live``: always live."""
        return {"live": True}

    async def ready(self) -> Response:
        """``GET /v2/health/ready``: ready when the upstream lists its models."""
        try:
            ok = (await self.client.get("/openai/v1/models")).status_code == 200
        except httpx.TransportError:
            ok = False
        return JSONResponse({"ready": ok}, 200 if ok else 503)


def proxy_app(
    upstream: str,
    table: RouteTable,
    admin_token: str | None = None,
    metrics: ServingMetrics | None = None,
    timeout_s: float = 120.0,
) -> FastAPI:
    """A standalone router in front of an OpenAI-compatible server.

    Serves ``POST /openai/v1/chat/completions`` and ``/openai/v1/completions`` (streamed
    through as they come), ``GET /openai/v1/models`` (the upstream's models plus the
    routes, ``parent`` = their first target), ``/admin/routes``, ``/metrics`` and KServe's
    ``/v2/health/live`` and ``/v2/health/ready`` (ready when the upstream lists models).

    Args:
        upstream: the upstream's base URL, e.g. ``http://predictor:8080``.
        table: the routes.
        admin_token: bearer token of ``/admin`` (``None``: admin API disabled).
        metrics: where to count; a fresh registry when ``None``.
        timeout_s: upstream timeout per request.
    """
    client = httpx.AsyncClient(base_url=upstream.rstrip("/"), timeout=timeout_s)
    handlers = _ProxyHandlers(client, table, metrics or ServingMetrics())
    app = FastAPI(title="lorafleet router")
    app.router.add_event_handler("shutdown", client.aclose)
    app.include_router(routes_admin_router(table, admin_token))
    app.post("/openai/v1/chat/completions")(handlers.chat_completions)
    app.post("/openai/v1/completions")(handlers.completions)
    app.get("/openai/v1/models")(handlers.models)
    app.get("/metrics")(handlers.scrape)
    app.get("/v2/health/live")(handlers.live)
    app.get("/v2/health/ready")(handlers.ready)
    return app
