"""The admin API: load and unload adapters at runtime, behind a bearer token.

``GET /admin/adapters`` lists what is served; ``PUT /admin/adapters/{name}`` with
``{"source": "DIR | pvc://... | s3://... | gs://..."}`` checks and loads an adapter (a
new version of a served name replaces the old one only once it passed every check);
``DELETE /admin/adapters/{name}`` unloads one. A rejected adapter answers 422 with
``{"error": {"message", "code": <reason>}}`` and whatever was serving keeps serving.

The token comes from ``$LORAFLEET_ADMIN_TOKEN`` (or the server's ``--admin-token-env``);
without one the admin API answers 403 to everything.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorafleet.errors import LorafleetError, first_problem
from lorafleet.serve.adapters import AdapterRejected

if TYPE_CHECKING:
    from pathlib import Path

    from lorafleet.serve.adapters import AdapterInfo
    from lorafleet.serve.routes import RouteTable

__all__ = [
    "AdapterServer",
    "AdminError",
    "LoadAdapter",
    "adapters_admin_router",
    "allow_every_method",
    "bearer_auth",
    "request_body",
    "table_admin_router",
]


class Detail(BaseModel):
    """A 401, 403 or 404 of the admin API."""

    detail: str


class AdminErrorBody(BaseModel):
    message: str
    code: str | None = None


class AdminError(BaseModel):
    """A 409 or 422 of the admin API: the request was understood and refused."""

    error: AdminErrorBody


# Every admin route answers these when the token is missing or wrong, or none is configured.
ADMIN_ANSWERS: dict[int | str, dict[str, Any]] = {401: {"model": Detail}, 403: {"model": Detail}}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Detail}}
REFUSED: dict[int | str, dict[str, Any]] = {422: {"model": AdminError}}


def _inline_defs(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        if ref.startswith("#/$defs/"):
            return _inline_defs(defs[ref.removeprefix("#/$defs/")], defs)
        return {key: _inline_defs(value, defs) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline_defs(value, defs) for value in node]
    return node


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of a route that parses its raw body with ``model`` (so
    FastAPI does not see it): the model's JSON schema, with pydantic's ``$defs`` inlined
    (they do not resolve inside an OpenAPI document)."""
    schema = model.model_json_schema()
    schema = _inline_defs(schema, schema.pop("$defs", {}))
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _matches(template: str, path: str) -> bool:
    """Whether ``path`` is an instance of an OpenAPI path template (``/admin/routes/{key}``)."""
    want, got = template.split("/"), path.split("/")
    if len(want) != len(got):
        return False
    return all(
        w == g or (w[:1] == "{" and w[-1:] == "}" and g) for w, g in zip(want, got, strict=True)
    )


async def allow_every_method(request: Request, exc: StarletteHTTPException):
    """The serving apps' handler of HTTP errors: FastAPI's answer, with a 405's ``Allow``
    listing every method the published schema gives the path (Starlette names only those
    of the first route that matched it, e.g. ``GET`` for ``/admin/routes/{key}``, which also
    takes ``PUT`` and ``DELETE``); ``HEAD`` with ``GET``, as Starlette serves both."""
    if exc.status_code == 405:
        methods = set()
        for template, operations in request.app.openapi()["paths"].items():
            if _matches(template, request.url.path):
                methods |= {method.upper() for method in operations}
        if "GET" in methods:
            methods.add("HEAD")
        exc = StarletteHTTPException(405, exc.detail, headers={"Allow": ", ".join(sorted(methods))})
    return await http_exception_handler(request, exc)


def bearer_auth(token: str | None):
    """A FastAPI dependency that lets through requests with ``Authorization: Bearer <token>``.

    Args:
        token: the expected token; ``None`` or empty disables the admin API (403).
    """

    async def check(request: Request) -> None:
        if not token:
            raise HTTPException(403, "admin API disabled: no admin token configured")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), token.encode()):
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    return check


class AdminTable(Protocol):
    """A named table the admin API edits (the router's routes, the runtime's faults)."""

    def as_dict(self) -> dict[str, Any]: ...
    def get(self, key: str) -> BaseModel | None: ...
    def set(self, key: str, value: Any) -> None: ...
    def delete(self, key: str) -> None: ...


def table_admin_router(
    path: str,
    model: type[BaseModel],
    table: AdminTable,
    token: str | None,
    missing: Callable[[str], str],
    deleted: Callable[[str], dict],
    check: Callable[[str, Any], str | None] | None = None,
) -> APIRouter:
    """``GET /admin/<path>`` and ``GET/PUT/DELETE /admin/<path>/{key}`` behind the bearer token.

    Args:
        path: the collection's path segment; the listing is ``{path: table.as_dict()}``.
        model: the body of a PUT, validated (422 naming the field on a mistake).
        table: what the routes read and change.
        token: the admin bearer token (``None``: admin API disabled).
        missing: the 404 message for a key the table does not hold.
        deleted: the body answering a DELETE.
        check: a PUT's extra check after the body parsed: a 422 message, or ``None``; it
            may raise :class:`AdapterRejected` (a bad key), as ``table.set`` may.
    """
    router = APIRouter(
        prefix="/admin", dependencies=[Depends(bearer_auth(token))], responses=ADMIN_ANSWERS
    )

    @router.get(f"/{path}")
    async def list_items() -> dict:
        return {path: table.as_dict()}

    @router.get(f"/{path}/{{key}}", responses=NOT_FOUND)
    async def get_item(key: str) -> dict:
        item = table.get(key)
        if item is None:
            raise HTTPException(404, missing(key))
        return item.model_dump()

    @router.put(
        f"/{path}/{{key}}", responses=REFUSED, openapi_extra={"requestBody": request_body(model)}
    )
    async def put_item(key: str, request: Request):
        try:
            item = model.model_validate_json(await request.body(), strict=True)
            problem = check(key, item) if check is not None else None
            if problem:
                return JSONResponse({"error": {"message": problem}}, 422)
            table.set(key, item)
        except ValidationError as exc:
            return JSONResponse({"error": {"message": first_problem(exc, "body")}}, 422)
        except AdapterRejected as exc:
            return JSONResponse({"error": {"message": str(exc)}}, 422)
        return item.model_dump()

    @router.delete(f"/{path}/{{key}}", responses=NOT_FOUND)
    async def delete_item(key: str) -> dict:
        try:
            table.delete(key)
        except KeyError:
            raise HTTPException(404, missing(key)) from None
        return deleted(key)

    return router


class LoadAdapter(BaseModel):
    """Body of ``PUT /admin/adapters/{name}``."""

    source: str = Field(min_length=1)


def _rejected(exc: LorafleetError) -> JSONResponse:
    code = exc.reason if isinstance(exc, AdapterRejected) else "load"
    return JSONResponse({"error": {"message": str(exc), "code": code}}, status_code=422)


class AdapterServer(Protocol):
    """What the adapter admin routes drive: the native runtime
    (:class:`~lorafleet.serve.model.LorafleetRuntime`) or the vLLM front
    (:class:`~lorafleet.serve.vllm_front.VllmAdapters`)."""

    name: str
    routes: RouteTable

    def adapter_table(self) -> list[dict[str, Any]]: ...
    async def load_adapter(self, name: str, source: str | Path) -> AdapterInfo: ...
    async def unload_adapter(self, name: str) -> None: ...


def adapters_admin_router(runtime: AdapterServer, token: str | None) -> APIRouter:
    """The adapter admin routes of a runtime, all behind :func:`bearer_auth`."""
    router = APIRouter(
        prefix="/admin", dependencies=[Depends(bearer_auth(token))], responses=ADMIN_ANSWERS
    )

    @router.get("/adapters")
    async def list_adapters() -> dict:
        return {"base": runtime.name, "adapters": runtime.adapter_table()}

    @router.get("/adapters/{name}", responses=NOT_FOUND)
    async def get_adapter(name: str) -> dict:
        entry = next((a for a in runtime.adapter_table() if a["name"] == name), None)
        if entry is None:
            raise HTTPException(404, f"no adapter {name!r} is loaded")
        return entry

    @router.put(
        "/adapters/{name}",
        responses=REFUSED,
        openapi_extra={"requestBody": request_body(LoadAdapter)},
    )
    async def load_adapter(name: str, request: Request):
        # The body is parsed here, whatever its content type, as the routes and faults
        # endpoints do: a mistake is one message naming the field, not FastAPI's raw 422.
        try:
            body = LoadAdapter.model_validate_json(await request.body(), strict=True)
        except ValidationError as exc:
            return JSONResponse(
                {"error": {"message": first_problem(exc, "body"), "code": "body"}}, 422
            )
        try:
            info = await runtime.load_adapter(name, body.source)
        except LorafleetError as exc:
            return _rejected(exc)
        return {"name": name, "path": str(info.path), "rank": info.rank, "status": "serving"}

    @router.delete("/adapters/{name}", responses={**NOT_FOUND, 409: {"model": AdminError}})
    async def unload_adapter(name: str):
        routes = [
            route
            for route, spec in runtime.routes.as_dict().items()
            if any(t["adapter"] == name for t in spec["targets"])
        ]
        if routes:
            message = (
                f"adapter {name!r} is a target of route{'s' if len(routes) > 1 else ''} "
                f"{', '.join(map(repr, routes))}; move the routes off it first "
                "(PUT /admin/routes/NAME)"
            )
            return JSONResponse({"error": {"message": message, "code": "in_use"}}, 409)
        try:
            await runtime.unload_adapter(name)
        except KeyError:
            raise HTTPException(404, f"no adapter {name!r} is loaded") from None
        return {"name": name, "status": "unloaded"}

    return router
