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

Every answer of the completion routes is counted with its status, as the runtime counts
its own: the router's refusals, the upstream's answers, a stream by how it ended (the
status of an error event the upstream sent after its 200, 502 when the upstream broke
off, 499 when the client left) and a fault of the router itself (500).

Run it with ``lorafleet router --upstream URL [--routes FILE]`` or, as the transformer
container does, ``python -m lorafleet.serve.router``. In front of vLLM
(:mod:`lorafleet.serve.vllm_front`) the same app also injects the faults of canary drills
(:mod:`lorafleet.serve.faults`), as the runtime does, and its health answers are the
front's checks (vLLM's process running; vLLM healthy with its start-up adapters loaded).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from lorafleet.serve.admin import allow_every_method
from lorafleet.serve.auth import ApiKeys
from lorafleet.serve.faults import FaultTable, faults_admin_router
from lorafleet.serve.metrics import UNKNOWN_MODEL, ServingMetrics
from lorafleet.serve.routes import RouteTable, routes_admin_router

__all__ = ["proxy_app"]

log = logging.getLogger(__name__)

# The most bytes of an unfinished server-sent event kept while looking for error events.
_MAX_EVENT_BYTES = 64 * 1024


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


def _reason(exc: BaseException) -> str:
    """An upstream error in words (a timeout's message is empty)."""
    return str(exc) or type(exc).__name__


def _usage(body: bytes) -> tuple[int, int]:
    try:
        usage = json.loads(body).get("usage") or {}
        return int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    except (ValueError, TypeError, AttributeError):  # not the upstream's to break the router
        return 0, 0


def _error_event_status(event: bytes) -> int | None:
    """The status of a server-sent error event (``data: {"error": {..., "code": 500}}``, as
    the runtime ends a stream that failed after its 200): the code when it is an HTTP status,
    else 500; ``None`` for any other event."""
    for line in event.splitlines():
        if not (line.startswith(b"data:") and b'"error"' in line):
            continue
        try:
            error = json.loads(line[5:]).get("error")
        except (ValueError, AttributeError):
            continue
        if isinstance(error, dict):
            code = error.get("code")
            return code if isinstance(code, int) and 400 <= code <= 599 else 500
    return None


class _StreamStatus:
    """The status a relayed stream ends with: the upstream's, or that of its error event."""

    def __init__(self, status: int) -> None:
        self.status = status
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        if not self._tail and chunk.endswith(b"\n\n") and b'"error"' not in chunk:
            return  # whole events, none an error (the common chunk: one token's event)
        *events, self._tail = (self._tail + chunk).replace(b"\r\n", b"\n").split(b"\n\n")
        for event in events:
            failed = _error_event_status(event)
            if failed is not None:
                self.status = failed
        if len(self._tail) > _MAX_EVENT_BYTES:  # not an error event of ours; stop holding it
            self._tail = b""


@dataclass
class _Tally:
    """What one completion request is counted under."""

    model: str = UNKNOWN_MODEL
    adapter: str = UNKNOWN_MODEL
    tokens: tuple[int, int] = (0, 0)


# How long an idle connection to the upstream's socket is kept: less than the upstream's own
# idle timeout (vLLM closes one after 5 s, VLLM_HTTP_TIMEOUT_KEEP_ALIVE), so that a request
# seldom meets a connection the upstream is closing (and one that does is sent again).
_KEEPALIVE_S = 2.0

# What an upstream call raises when the upstream cannot be reached or breaks off: aiohttp's
# errors, and its read and connect timeouts (asyncio's TimeoutError).
_UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


class _Upstream:
    """The one client of the upstream: an :class:`aiohttp.ClientSession`, made in the event
    loop that first uses it (and again for another loop).

    aiohttp, not httpx: relaying a stream event by event is the router's hot path, and
    aiohttp parses HTTP in C where httpx's stack (httpcore, h11, anyio) is Python: the
    router's CPU per streamed token halved (bench/router_cpu.py, docs/benchmarks.md).

    No cap on connections to the upstream: its own queue bounds the work (a cap of 100 made
    the 101st concurrent stream wait for a connection, its first token late). Over TCP no
    idle connection is reused: vLLM's server leaves Nagle's algorithm on (its listening
    socket is made without IPPROTO_TCP, so asyncio never sets TCP_NODELAY), and on a reused
    connection each small streamed event then waits for the delayed ACK: a burst of short
    streams through the router ran 5-8x slower (bench/vllm_compare.py). Over a Unix socket
    (``uds``: the vLLM front's way to vLLM) there is no Nagle, and connections are reused.

    Args:
        base_url: the upstream's base URL (over ``uds``, only its path is used).
        timeout_s: the longest wait to connect, and between two reads of an answer.
        uds: the upstream's Unix socket; TCP when ``None``.
    """

    def __init__(self, base_url: str, timeout_s: float, uds: str | None = None) -> None:
        self.base_url, self.uds = base_url.rstrip("/"), uds
        self.timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_read=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            connector: aiohttp.BaseConnector
            if self.uds is not None:  # no Nagle on a Unix socket: connections are reused
                connector = aiohttp.UnixConnector(self.uds, limit=0, keepalive_timeout=_KEEPALIVE_S)
            else:
                connector = aiohttp.TCPConnector(limit=0, force_close=True)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout)
            self._loop = loop
        return self._session

    def url(self, path: str) -> str:
        return self.base_url + path

    async def post(
        self, path: str, body: dict[str, Any], headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        """``POST`` a JSON body; the response's body is left to read.

        A request sent on a reused connection that the upstream closed as it arrived (its
        idle timeout ran out at that moment) is sent once more, on a new connection: the
        upstream never read it. aiohttp retries only idempotent methods itself.
        """
        data = json.dumps(body).encode()
        headers = {"content-type": "application/json", **headers}
        try:
            return await self.session().post(self.url(path), data=data, headers=headers)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            if self.uds is None:  # over TCP no connection is reused
                raise
        return await self.session().post(self.url(path), data=data, headers=headers)

    async def aclose(self) -> None:
        if self._session is not None and self._loop is asyncio.get_running_loop():
            await self._session.close()
        self._session = None


class _ProxyHandlers:
    """The proxy's route handlers; every upstream call goes through one client.

    Args:
        upstream: the upstream's client.
        table: the routes.
        metrics: where to count.
        api_keys: the keys the OpenAI routes require; open when ``None``.
        prefix: the upstream's path of the OpenAI API (``/openai/v1``, vLLM's ``/v1``).
        faults: faults injected per adapter before forwarding; none when ``None``.
        is_live: the liveness check; always live when ``None``.
        is_ready: the readiness check; the upstream lists its models when ``None``.
    """

    def __init__(
        self,
        upstream: _Upstream,
        table: RouteTable,
        metrics: ServingMetrics,
        api_keys: ApiKeys | None = None,
        prefix: str = "/openai/v1",
        faults: FaultTable | None = None,
        is_live: Callable[[], bool] | None = None,
        is_ready: Callable[[], Awaitable[bool]] | None = None,
    ):
        self.upstream, self.table, self.metrics = upstream, table, metrics
        self.api_keys, self.prefix, self.faults = api_keys, prefix, faults
        self.is_live, self.is_ready = is_live, is_ready

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
        return await self.forward(request, f"{self.prefix}/chat/completions")

    async def completions(self, request: Request) -> Response:
        """``POST /openai/v1/completions``."""
        return await self.forward(request, f"{self.prefix}/completions")

    async def forward(self, request: Request, path: str) -> Response:
        """Send a completion request to its route's adapter and count the answer, whatever
        raised on the way (a 500, logged with its traceback); streams count themselves."""
        start, tally = time.perf_counter(), _Tally()
        try:
            response = await self._forward(request, path, start, tally)
        except Exception as exc:
            log.error("forwarding a completion for %r failed", tally.adapter, exc_info=exc)
            message = f"the router failed to answer ({type(exc).__name__})"
            response = _error(500, message, "internal_error")
        if not isinstance(response, StreamingResponse):
            elapsed = time.perf_counter() - start
            self.metrics.observe(
                tally.model, tally.adapter, response.status_code, elapsed, *tally.tokens
            )
        return response

    async def _forward(self, request: Request, path: str, start: float, tally: _Tally) -> Response:
        """Send a completion request to its route's adapter; streams are relayed as they come."""
        refused = self.refuse(request)
        if refused is not None:
            return refused
        body = _parse(await request.body())
        if isinstance(body, str):
            return _error(400, body, "invalid_body")
        model = body["model"]
        adapter = self.table.resolve(model, request.headers)
        body["model"] = adapter
        # A name the router does not route is the client's string: labelled only once the
        # upstream has shown it serves it.
        if model in self.table:
            tally.model, tally.adapter = model, adapter
        injected = None if self.faults is None else await self.faults.inject(adapter)
        if injected is not None:  # canary drills only: a fault is set on a named adapter
            tally.model, tally.adapter = model, adapter
            message = f"injected fault on {adapter!r} (canary drill, /admin/faults)"
            return _error(injected, message, "injected_fault", {"x-lorafleet-adapter": adapter})
        auth = {"authorization": request.headers["authorization"]} if self.api_keys else {}
        try:
            response = await self.upstream.post(path, body, auth)
        except _UPSTREAM_ERRORS as exc:
            return _error(503, f"upstream unreachable: {_reason(exc)}", "upstream_unreachable")
        # A name the router does not route passes through as the client wrote it; only a
        # printable ASCII one can be a header value (others made the answer a 500).
        shown = adapter.isascii() and adapter.isprintable()
        headers = {"x-lorafleet-adapter": adapter} if shown else {}
        for name in ("content-type", "retry-after"):
            if name in response.headers:
                headers[name] = response.headers[name]
        # Labelled with the client's string only once the upstream has shown it serves that
        # model: it answered, or failed serving it (5xx). A 404 says it serves no such model,
        # and another 4xx (a bad body) may come before the name is looked at: any client
        # could grow the series without bound.
        if response.status < 400 or response.status >= 500:
            tally.model, tally.adapter = model, adapter
        if body.get("stream"):
            relay = self._relay(response, tally, start)
            return StreamingResponse(relay, response.status, headers)
        try:
            content = await response.read()
        except _UPSTREAM_ERRORS as exc:
            message = f"upstream broke off its answer: {_reason(exc)}"
            return _error(502, message, "upstream_failed")
        finally:
            response.release()
        tally.tokens = _usage(content)
        return Response(content, response.status, headers)

    async def _relay(
        self, response: aiohttp.ClientResponse, tally: _Tally, start: float
    ) -> AsyncIterator[bytes]:
        """The upstream's stream, chunk by chunk; counted once it ends (with the status of
        an error event in it, if any), breaks off (502) or the client leaves (499)."""
        ended = _StreamStatus(response.status)
        status = 499  # stays if the client goes away mid-stream
        try:
            try:
                async for chunk in response.content.iter_any():
                    ended.feed(chunk)
                    yield chunk
                status = ended.status
            except _UPSTREAM_ERRORS as exc:
                status = 502
                message = f"upstream broke off the stream: {_reason(exc)}"
                yield f"data: {json.dumps({'error': {'message': message, 'code': status}})}\n\n".encode()
        finally:
            response.release()
            self.metrics.observe(tally.model, tally.adapter, status, time.perf_counter() - start)

    async def models(self, request: Request) -> Response:
        """``GET /openai/v1/models``: the routes (``parent`` = first target), then the upstream's."""
        refused = self.refuse(request)
        if refused is not None:
            return refused
        auth = {"authorization": request.headers["authorization"]} if self.api_keys else {}
        try:
            async with self.upstream.session().get(
                self.upstream.url(f"{self.prefix}/models"), headers=auth
            ) as response:
                content = await response.read()
        except _UPSTREAM_ERRORS as exc:
            return _error(503, f"upstream unreachable: {_reason(exc)}", "upstream_unreachable")
        if response.status != 200:
            return Response(content, response.status)
        listing = json.loads(content)
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

    async def live(self) -> Response:
        """``GET /v2/health/live``: live unless the liveness check says otherwise."""
        ok = self.is_live is None or self.is_live()
        return JSONResponse({"live": ok}, 200 if ok else 503)

    async def ready(self) -> Response:
        """``GET /v2/health/ready``: the readiness check's answer; by default, ready when
        the upstream lists its models, or answers that listing with 401 (it is up, and
        wants an API key the probe does not have)."""
        if self.is_ready is not None:
            ok = await self.is_ready()
        else:
            url = self.upstream.url(f"{self.prefix}/models")
            try:
                async with self.upstream.session().get(url) as response:
                    ok = response.status in (200, 401)
            except _UPSTREAM_ERRORS:
                ok = False
        return JSONResponse({"ready": ok}, 200 if ok else 503)


def proxy_app(
    upstream: str,
    table: RouteTable,
    admin_token: str | None = None,
    metrics: ServingMetrics | None = None,
    timeout_s: float = 120.0,
    api_keys: ApiKeys | None = None,
    *,
    upstream_prefix: str = "/openai/v1",
    faults: FaultTable | None = None,
    upstream_uds: str | None = None,
    known: Callable[[str], bool] | None = None,
    is_live: Callable[[], bool] | None = None,
    is_ready: Callable[[], Awaitable[bool]] | None = None,
) -> FastAPI:
    """A standalone router in front of an OpenAI-compatible server.

    Serves ``POST /openai/v1/chat/completions`` and ``/openai/v1/completions`` (streamed
    through as they come), ``GET /openai/v1/models`` (the upstream's models plus the
    routes, ``parent`` = their first target), ``/admin/routes``, ``/metrics`` and KServe's
    ``/v2/health/live`` and ``/v2/health/ready`` (ready when the upstream lists models);
    with ``faults``, also ``/admin/faults``.

    Args:
        upstream: the upstream's base URL, e.g. ``http://predictor:8080``.
        table: the routes.
        admin_token: bearer token of ``/admin`` (``None``: admin API disabled).
        metrics: where to count; a fresh registry when ``None``.
        timeout_s: upstream timeout per request.
        api_keys: the keys the OpenAI routes require; open when ``None``.
        upstream_prefix: the upstream's path of the OpenAI API: ``/openai/v1`` (the
            lorafleet runtime, KServe) or ``/v1`` (vLLM).
        faults: faults of canary drills, applied to a request's adapter before it is
            forwarded (an injected failure is answered by the router and counted) and
            edited through ``/admin/faults``; none, and no such route, when ``None``.
        upstream_uds: the upstream's Unix socket (``upstream`` then gives only the scheme
            and host of the requests); TCP to ``upstream`` when ``None``.
        known: whether an adapter name is served: a route naming another is refused (422);
            ``None`` accepts any name.
        is_live: the liveness check (e.g. a supervised upstream process is running);
            always live when ``None``.
        is_ready: the readiness check; when ``None``, the upstream lists its models.
    """
    client = _Upstream(upstream, timeout_s, upstream_uds)
    handlers = _ProxyHandlers(
        client,
        table,
        metrics or ServingMetrics(),
        api_keys,
        prefix=upstream_prefix.rstrip("/"),
        faults=faults,
        is_live=is_live,
        is_ready=is_ready,
    )
    app = FastAPI(title="lorafleet router")
    app.router.add_event_handler("shutdown", client.aclose)
    app.include_router(routes_admin_router(table, admin_token, known))
    if faults is not None:
        app.include_router(faults_admin_router(faults, admin_token))
    errors = {status: {"model": ProxyError} for status in (400, 401, 404, 429, 500, 502, 503)}
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
    app.get("/v2/health/live", responses={503: {}})(handlers.live)
    app.get("/v2/health/ready", responses={503: {}})(handlers.ready)
    app.add_exception_handler(HTTPException, allow_every_method)
    return app
