"""The standalone router: an OpenAI-compatible proxy that applies a route table.

:func:`proxy_app` sits in front of any OpenAI-compatible upstream (the lorafleet runtime
or vLLM), deployed as a KServe transformer. Each request's ``model`` is resolved through
a :class:`~lorafleet.serve.routes.RouteTable` (weighted, optionally sticky) before it is
forwarded; ``/admin/routes`` changes the weights at runtime (bearer token).

With API keys (:mod:`lorafleet.serve.auth`) the router checks each request's key and
rate itself and forwards the client's ``Authorization`` header, so an upstream with the
same keys accepts it too. The published OpenAPI schema names what the router checks (a
JSON object with a string ``model`` and, if present, a boolean ``stream``) and every status
it answers; the rest of a body is the upstream's to judge, and its answer is passed on.

Run it with ``lorafleet router --upstream URL [--routes FILE]`` or, as the transformer
container does, ``python -m lorafleet.serve.router``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from lorafleet.serve.admin import allow_every_method
from lorafleet.serve.auth import ApiKeys
from lorafleet.serve.metrics import UNKNOWN_MODEL, ServingMetrics
from lorafleet.serve.routes import RouteTable, routes_admin_router

__all__ = ["proxy_app"]


# What the router itself checks of a completion request; the upstream judges the rest.
_FORWARDED_BODY = {
    "type": "object",
    "required": ["model"],
    "properties": {"model": {"type": "string"}, "stream": {"type": "boolean"}},
}


class _ErrorDetail(BaseModel):
    message: str
    type: str | None = None
    param: str | None = None
    code: str | int | None = None


class ProxyError(BaseModel):
    """An error answer of the router (or of the upstream, passed on)."""

    error: _ErrorDetail


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None):
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"message": message, "type": kind, "param": None, "code": code}
    return JSONResponse({"error": body}, status, headers=headers)


def _parse(raw: bytes) -> dict[str, Any] | str:
    """The request body, or what is wrong with it."""
    try:
        body = json.loads(raw)
    except ValueError:
        return "body: not valid JSON"
    if not isinstance(body, dict):
        return "body: expected a JSON object"
    if not isinstance(body.get("model"), str):
        return "model: a string is required"
    if not isinstance(body.get("stream", False), bool):
        return "stream: expected true or false"
    return body


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

    def __init__(
        self,
        client: httpx.AsyncClient,
        table: RouteTable,
        metrics: ServingMetrics,
        api_keys: ApiKeys | None = None,
    ):
        self.client, self.table, self.metrics = client, table, metrics
        self.api_keys = api_keys

    def refuse(self, request: Request) -> Response | None:
        """The 401/429 answer for a request without a valid key or over its rate; ``None``
        when no keys are configured or the request may go on."""
        if self.api_keys is None:
            return None
        refusal = self.api_keys.admit(request.headers.get("authorization"))
        if refusal is None:
            return None
        self.metrics.reject(refusal.reason)
        return JSONResponse(refusal.body(), refusal.status, refusal.headers())

    async def chat_completions(self, request: Request) -> Response:
        """``POST /openai/v1/chat/completions``."""
        return await self.forward(request, "/openai/v1/chat/completions")

    async def completions(self, request: Request) -> Response:
        """``POST /openai/v1/completions``."""
        return await self.forward(request, "/openai/v1/completions")

    async def forward(self, request: Request, path: str) -> Response:
        """Send a completion request to its route's adapter; streams are relayed as they come."""
        refused = self.refuse(request)
        if refused is not None:
            return refused
        start = time.perf_counter()
        body = _parse(await request.body())
        if isinstance(body, str):
            return _error(400, body, "invalid_body")
        model = body["model"]
        adapter = self.table.resolve(model, request.headers)
        body["model"] = adapter
        auth = {"authorization": request.headers["authorization"]} if self.api_keys else {}
        upstream_request = self.client.build_request("POST", path, json=body, headers=auth)
        try:
            response = await self.client.send(upstream_request, stream=True)
        except httpx.TransportError as exc:
            self.metrics.observe(model, adapter, 503, time.perf_counter() - start)
            return _error(503, f"upstream unreachable: {exc}", "upstream_unreachable")
        # A name the router does not route passes through as the client wrote it; only a
        # printable ASCII one can be a header value (others made the answer a 500).
        shown = adapter.isascii() and adapter.isprintable()
        headers = {"x-lorafleet-adapter": adapter} if shown else {}
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

    async def models(self, request: Request) -> Response:
        """``GET /openai/v1/models``: the routes (``parent`` = first target), then the upstream's."""
        refused = self.refuse(request)
        if refused is not None:
            return refused
        auth = {"authorization": request.headers["authorization"]} if self.api_keys else {}
        try:
            response = await self.client.get("/openai/v1/models", headers=auth)
        except httpx.TransportError as exc:
            return _error(503, f"upstream unreachable: {exc}", "upstream_unreachable")
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
        """``GET /v2/health/ready``: ready when the upstream lists its models, or answers
        that listing with 401 (it is up, and wants an API key the probe does not have)."""
        try:
            ok = (await self.client.get("/openai/v1/models")).status_code in (200, 401)
        except httpx.TransportError:
            ok = False
        return JSONResponse({"ready": ok}, 200 if ok else 503)


def proxy_app(
    upstream: str,
    table: RouteTable,
    admin_token: str | None = None,
    metrics: ServingMetrics | None = None,
    timeout_s: float = 120.0,
    api_keys: ApiKeys | None = None,
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
        api_keys: the keys the OpenAI routes require; open when ``None``.
    """
    client = httpx.AsyncClient(base_url=upstream.rstrip("/"), timeout=timeout_s)
    handlers = _ProxyHandlers(client, table, metrics or ServingMetrics(), api_keys)
    app = FastAPI(title="lorafleet router")
    app.router.add_event_handler("shutdown", client.aclose)
    app.include_router(routes_admin_router(table, admin_token))
    errors = {status: {"model": ProxyError} for status in (400, 401, 404, 429, 503)}
    completion = {
        "responses": {
            200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
            **errors,
        },
        "openapi_extra": {
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _FORWARDED_BODY}},
            }
        },
    }
    app.post("/openai/v1/chat/completions", **completion)(handlers.chat_completions)
    app.post("/openai/v1/completions", **completion)(handlers.completions)
    app.get("/openai/v1/models", responses=errors)(handlers.models)
    prometheus = {200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {}}}}}
    app.get("/metrics", response_class=Response, responses=prometheus)(handlers.scrape)
    app.get("/v2/health/live")(handlers.live)
    app.get("/v2/health/ready", responses={503: {}})(handlers.ready)
    app.add_exception_handler(HTTPException, allow_every_method)
    return app
