"""The adapter router: public model names -> adapter versions with traffic weights.

A route such as ``proposal-writer -> proposal-writer-v3: 90, proposal-writer-v4: 10`` is
an adapter-level canary. A request's ``model`` that names a route is sent to one of its
targets at random in proportion to the weights or, when the route has a
``sticky_header`` and the request carries it, by a hash of that header's value (the same
user stays on the same version while the weights hold). Any other ``model`` passes
through unchanged.

The table lives in the runtime (:mod:`lorafleet.serve.runtime`) and in
:func:`proxy_app`, a standalone OpenAI-compatible proxy for any upstream (the lorafleet
runtime or vLLM) deployed as a KServe transformer. In both, weights change at runtime
through ``GET/PUT/DELETE /admin/routes/{name}`` (bearer token), with the JSON body of
:class:`Route`::

    {"targets": [{"adapter": "proposal-writer-v3", "weight": 90},
                 {"adapter": "proposal-writer-v4", "weight": 10}],
     "sticky_header": "x-user-id"}

Run the proxy with ``python -m lorafleet.serve.router --upstream URL [--routes FILE]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, field_validator, model_validator

from lorafleet.errors import LorafleetError
from lorafleet.serve.adapters import AdapterRejected, validate_name
from lorafleet.serve.metrics import ServingMetrics

__all__ = ["Route", "RouteTable", "RouteTarget", "main", "proxy_app", "routes_admin_router"]


class RouteTarget(BaseModel):
    """One adapter version of a route and its share of the traffic."""

    adapter: str
    weight: float = Field(ge=0)

    @field_validator("adapter")
    @classmethod
    def _name(cls, value: str) -> str:
        try:
            return validate_name(value)
        except AdapterRejected as exc:
            raise ValueError(exc.detail) from None


class Route(BaseModel):
    """A public model name's targets; weights are relative (90/10 or 0.9/0.1 alike)."""

    targets: list[RouteTarget] = Field(min_length=1)
    sticky_header: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Route:
        names = [t.adapter for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError("each adapter may appear once in a route")
        if sum(t.weight for t in self.targets) <= 0:
            raise ValueError("at least one target needs a positive weight")
        return self

    def pick(self, route_name: str, headers: Mapping[str, str], rng: random.Random) -> str:
        """The adapter for one request (see the module docstring)."""
        total = sum(t.weight for t in self.targets)
        key = headers.get(self.sticky_header) if self.sticky_header else None
        if key is not None:
            digest = hashlib.sha256(f"{route_name}\0{key}".encode()).digest()
            point = int.from_bytes(digest[:8], "big") / 2**64 * total
        else:
            point = rng.random() * total
        for target in self.targets:
            if point < target.weight:
                return target.adapter
            point -= target.weight
        return next(t.adapter for t in reversed(self.targets) if t.weight > 0)


class RouteTable:
    """Routes by public name; changed only on the event loop, so no locking.

    Args:
        routes: the initial routes.
        seed: seed of the random choice (tests); system randomness when ``None``.
    """

    def __init__(self, routes: Mapping[str, Route] | None = None, seed: int | None = None) -> None:
        self._routes: dict[str, Route] = {}
        for name, route in (routes or {}).items():
            self.set(name, route)
        self._rng = random.Random(seed)

    @classmethod
    def from_file(cls, path: str | Path) -> RouteTable:
        """Read ``{"routes": {name: Route}}`` from a JSON file.

        Raises:
            LorafleetError: naming the file and the field, if it is malformed.
        """
        try:
            raw = json.loads(Path(path).read_text())
            return cls({n: Route.model_validate(r) for n, r in raw["routes"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            detail = str(exc).splitlines()[0] if not isinstance(exc, KeyError) else "no 'routes'"
            raise LorafleetError(f"{path}: routes file: {detail}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._routes

    def get(self, name: str) -> Route | None:
        """The route of a public name, if any."""
        return self._routes.get(name)

    def set(self, name: str, route: Route) -> None:
        """Add or replace a route."""
        self._routes[validate_name(name)] = route

    def delete(self, name: str) -> None:
        """Remove a route; raises ``KeyError`` if there is none."""
        del self._routes[name]

    def as_dict(self) -> dict[str, dict]:
        """Every route as JSON-ready dicts."""
        return {name: route.model_dump() for name, route in self._routes.items()}

    def resolve(self, model: str, headers: Mapping[str, str]) -> str:
        """The adapter a request for ``model`` goes to (``model`` itself if no route)."""
        route = self._routes.get(model)
        return model if route is None else route.pick(model, headers, self._rng)


def routes_admin_router(
    table: RouteTable, token: str | None, known: Callable[[str], bool] | None = None
) -> APIRouter:
    """``GET /admin/routes`` and ``GET/PUT/DELETE /admin/routes/{name}`` behind a bearer token.

    Args:
        table: the table to read and change.
        token: the admin bearer token (``None``: admin API disabled).
        known: says whether an adapter name is served; a PUT naming an unknown target is
            refused (422). ``None`` (a proxy that cannot tell) accepts any name.
    """
    from lorafleet.serve.admin import table_admin_router

    def check(name: str, route: Route) -> str | None:
        validate_name(name)
        unknown = [t.adapter for t in route.targets if known is not None and not known(t.adapter)]
        return f"route {name!r}: adapters not loaded: {', '.join(unknown)}" if unknown else None

    return table_admin_router(
        "routes",
        Route,
        table,
        token,
        missing=lambda name: f"no route {name!r}",
        deleted=lambda name: {"name": name, "status": "deleted"},
        check=check,
    )


def _usage(body: bytes) -> tuple[int, int]:
    try:
        usage = json.loads(body).get("usage") or {}
    except (ValueError, AttributeError):
        return 0, 0
    return int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))


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
    metrics = metrics or ServingMetrics()
    upstream = upstream.rstrip("/")
    client = httpx.AsyncClient(base_url=upstream, timeout=timeout_s)
    app = FastAPI(title="lorafleet router")
    app.router.add_event_handler("shutdown", client.aclose)
    app.include_router(routes_admin_router(table, admin_token))

    async def forward(request: Request, path: str) -> Response:
        start = time.perf_counter()
        try:
            body = json.loads(await request.body())
            model = body["model"]
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": {"message": "body: a JSON object with 'model'"}}, 400)
        adapter = table.resolve(model, request.headers)
        body["model"] = adapter
        upstream_request = client.build_request("POST", path, json=body)
        try:
            response = await client.send(upstream_request, stream=True)
        except httpx.TransportError as exc:
            metrics.observe(model, adapter, 503, time.perf_counter() - start)
            return JSONResponse({"error": {"message": f"upstream unreachable: {exc}"}}, 503)
        headers = {"x-lorafleet-adapter": adapter}
        for name in ("content-type", "retry-after"):
            if name in response.headers:
                headers[name] = response.headers[name]
        if not body.get("stream"):
            content = await response.aread()
            await response.aclose()
            metrics.observe(
                model,
                adapter,
                response.status_code,
                time.perf_counter() - start,
                *_usage(content),
            )
            return Response(content, response.status_code, headers)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:
                await response.aclose()
                metrics.observe(model, adapter, response.status_code, time.perf_counter() - start)

        return StreamingResponse(relay(), response.status_code, headers)

    @app.post("/openai/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await forward(request, "/openai/v1/chat/completions")

    @app.post("/openai/v1/completions")
    async def completions(request: Request) -> Response:
        return await forward(request, "/openai/v1/completions")

    @app.get("/openai/v1/models")
    async def models() -> Response:
        response = await client.get("/openai/v1/models")
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
            for name, route in table.as_dict().items()
        ]
        return JSONResponse({"object": "list", "data": routes + listing.get("data", [])})

    @app.get("/metrics")
    async def scrape() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        try:
            ok = (await client.get("/openai/v1/models")).status_code == 200
        except httpx.TransportError:
            ok = False
        return JSONResponse({"ready": ok}, 200 if ok else 503)

    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m lorafleet.serve.router --upstream URL [--routes FILE]``."""
    import uvicorn

    parser = argparse.ArgumentParser(
        prog="python -m lorafleet.serve.router",
        description="OpenAI-compatible router: sends each request to an adapter version of "
        "its route (weighted, optionally sticky) on an upstream server; /admin/routes "
        "changes the weights (bearer token from $LORAFLEET_ADMIN_TOKEN).",
    )
    parser.add_argument(
        "--upstream",
        "--predictor-host",
        "--predictor_host",
        required=True,
        help="upstream base URL, or host:port as KServe passes it to a transformer",
    )
    parser.add_argument("--routes", help='JSON file: {"routes": {NAME: {"targets": [...]}}}')
    parser.add_argument("--host", default="127.0.0.1", help="address (default: %(default)s)")
    parser.add_argument("--port", "--http_port", type=int, default=8080, help="HTTP port")
    parser.add_argument("--model_name", help=argparse.SUPPRESS)  # passed by KServe; unused
    args = parser.parse_args(argv)
    upstream = args.upstream if "://" in args.upstream else f"http://{args.upstream}"
    try:
        table = RouteTable.from_file(args.routes) if args.routes else RouteTable()
    except LorafleetError as exc:
        parser.exit(2, f"error: {exc}\n")
    app = proxy_app(upstream, table, os.environ.get("LORAFLEET_ADMIN_TOKEN"))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
