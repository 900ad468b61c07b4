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
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from lorafleet.errors import LorafleetError
from lorafleet.serve.adapters import AdapterRejected

if TYPE_CHECKING:
    from lorafleet.serve.runtime import LorafleetRuntime

__all__ = ["LoadAdapter", "adapters_admin_router", "bearer_auth"]


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


class LoadAdapter(BaseModel):
    """Body of ``PUT /admin/adapters/{name}``."""

    source: str


def _rejected(exc: LorafleetError) -> JSONResponse:
    code = exc.reason if isinstance(exc, AdapterRejected) else "load"
    return JSONResponse({"error": {"message": str(exc), "code": code}}, status_code=422)


def adapters_admin_router(runtime: LorafleetRuntime, token: str | None) -> APIRouter:
    """The adapter admin routes of a runtime, all behind :func:`bearer_auth`."""
    router = APIRouter(prefix="/admin", dependencies=[Depends(bearer_auth(token))])

    @router.get("/adapters")
    async def list_adapters() -> dict:
        return {"base": runtime.name, "adapters": runtime.adapter_table()}

    @router.put("/adapters/{name}")
    async def load_adapter(name: str, body: LoadAdapter):
        try:
            info = await runtime.load_adapter(name, body.source)
        except LorafleetError as exc:
            return _rejected(exc)
        return {"name": name, "path": str(info.path), "rank": info.rank, "status": "serving"}

    @router.delete("/adapters/{name}")
    async def unload_adapter(name: str):
        try:
            await runtime.unload_adapter(name)
        except KeyError:
            raise HTTPException(404, f"no adapter {name!r} is loaded") from None
        return {"name": name, "status": "unloaded"}

    return router
