"""The runtime's KServe health, readiness and metrics routes, with the schema they answer.

KServe's ``ModelServer`` publishes its whole v1/v2 inference protocol, most of which the
runtime does not serve (``infer``, ``predict``, model repository load/unload, versions):
those answered 5xx to ordinary client mistakes. The runtime keeps only what probes and
scrapers call, answered here: ``GET /v2/health/live``, ``GET /v2/health/ready``,
``GET /v2/models/{name}/ready``, ``GET /v1/models/{name}`` and ``GET /metrics``; a name
is the base or a loaded adapter, anything else is 404.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

if TYPE_CHECKING:
    from lorafleet.serve.model import LorafleetRuntime

__all__ = ["health_router"]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class NotFound(BaseModel):
    error: str


def health_router(runtime: LorafleetRuntime) -> APIRouter:
    """Health, readiness and ``/metrics`` of a runtime (see the module docstring)."""
    router = APIRouter()

    def model_ready(model_name: str) -> Response:
        if model_name != runtime.name and not runtime.has_adapter(model_name):
            return JSONResponse({"error": f"no model {model_name!r} is served"}, 404)
        return JSONResponse({"name": model_name, "ready": bool(runtime.ready)})

    @router.get("/v2/health/live", response_model=Live)
    async def live() -> dict:
        return {"live": True}

    @router.get("/v2/health/ready", response_model=Ready, responses={503: {"model": Ready}})
    async def ready() -> Response:
        ok = bool(runtime.ready)
        return JSONResponse({"ready": ok}, 200 if ok else 503)

    model_answers = {200: {"model": ModelReady}, 404: {"model": NotFound}}

    @router.get("/v2/models/{model_name}/ready", responses=model_answers)
    async def v2_model_ready(model_name: str) -> Response:
        return model_ready(model_name)

    @router.get("/v1/models/{model_name}", responses=model_answers)
    async def v1_model_ready(model_name: str) -> Response:
        return model_ready(model_name)

    prometheus = {
        200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}
    }

    @router.get("/metrics", response_class=Response, responses=prometheus)
    async def metrics() -> Response:
        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
