"""The lorafleet HTTP server: a loaded :class:`~lorafleet.serve.model.LorafleetRuntime`
on KServe's ``ModelServer``.

The OpenAI-compatible endpoints (:mod:`lorafleet.serve.openai_api`), the adapter admin
API (:mod:`lorafleet.serve.admin`), the route admin (:mod:`lorafleet.serve.routes`), the
fault admin (:mod:`lorafleet.serve.faults`) and the health, readiness and metrics routes
(:mod:`lorafleet.serve.health`) are mounted on KServe's FastAPI app, and they are all it
serves: the rest of KServe's v1/v2 protocol (``infer``, ``predict``, the model repository)
is not the runtime's, and is removed from the app when the server starts.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kserve import ModelServer
from starlette.exceptions import HTTPException

from lorafleet.serve.admin import adapters_admin_router, allow_every_method
from lorafleet.serve.auth import ApiKeys
from lorafleet.serve.batching import MAX_BATCH_SIZE, MAX_WAIT_S
from lorafleet.serve.faults import faults_admin_router
from lorafleet.serve.health import health_router
from lorafleet.serve.metrics import ServingMetrics
from lorafleet.serve.model import LorafleetRuntime, build_runtime
from lorafleet.serve.openai_api import openai_router
from lorafleet.serve.routes import routes_admin_router

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["listening_line", "mount", "serve"]


class _HostModelServer(ModelServer):
    """kserve's ModelServer, listening on a chosen address.

    kserve 0.21 hard-codes ``host="0.0.0.0"`` in ``RESTServer``'s ``uvicorn.Config`` and
    offers no option for it. ``start()`` builds that server and then awaits ``_serve()``;
    uvicorn reads ``config.host`` only when it binds, inside ``_serve()``, so setting it
    here takes effect.
    """

    def __init__(self, host: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.host = host

    async def _serve(self) -> None:
        self._rest_server.config.host = self.host
        await super()._serve()


def serve(
    base_dir: str | Path,
    adapters: Mapping[str, str | Path],
    host: str = "127.0.0.1",
    port: int = 8080,
    name: str = "base",
    max_batch_size: int = MAX_BATCH_SIZE,
    max_wait_s: float = MAX_WAIT_S,
    admin_token: str | None = None,
    api_keys: ApiKeys | None = None,
    **options: Any,
) -> None:
    """Load a runtime and serve it until SIGINT/SIGTERM.

    Args:
        base_dir: the base model directory (or hub id).
        adapters: adapter name -> adapter source.
        host: the address to listen on; ``0.0.0.0`` inside a cluster pod.
        port: the HTTP port (KServe v1/v2, ``/metrics``, ``/openai/v1`` and ``/admin``).
        name: the base model's served name.
        max_batch_size: the most requests decoding at once (continuous batching).
        max_wait_s: how long a first request waits, on an idle runtime, for others to share
            its prefill.
        admin_token: bearer token of the admin API; ``None`` disables it.
        api_keys: the keys the OpenAI routes require; open when ``None``.
        **options: further :class:`LorafleetRuntime` keyword arguments.
    """
    from kserve.model_server import app
    from prometheus_client import REGISTRY

    # KServe's /metrics exposes the default registry: count there.
    options.setdefault("metrics", ServingMetrics(REGISTRY))
    runtime = build_runtime(base_dir, adapters, name, max_batch_size, max_wait_s, **options)
    # KServe builds its routes on this module-level app when it starts; ours go in first.
    mount(app, runtime, admin_token, api_keys)
    print(listening_line(runtime, host, port), file=sys.stderr, flush=True)
    _HostModelServer(host=host, http_port=port, enable_grpc=False).start([runtime])


def listening_line(runtime: LorafleetRuntime, host: str, port: int) -> str:
    """The one line ``lorafleet serve`` prints when its models are loaded: where, and what."""
    models = [runtime.name, *runtime.adapters, *runtime.routes.as_dict()]
    return (
        f"listening on http://{host}:{port} (OpenAI API at /openai/v1, metrics at /metrics): "
        f"{len(models)} model{'s' if len(models) != 1 else ''}: {', '.join(models)}"
    )


def mount(
    app: FastAPI,
    runtime: LorafleetRuntime,
    admin_token: str | None,
    api_keys: ApiKeys | None = None,
) -> None:
    """Make a FastAPI app serve the runtime: ``/openai/v1``, ``/admin/adapters``,
    ``/admin/routes``, ``/admin/faults``, health, readiness and ``/metrics``, and nothing else.

    KServe adds its own v1/v2 routes to its app when the server starts, after this call;
    the app drops every route added after this call at startup, before the first request
    (and before the OpenAPI schema is built).

    Args:
        app: the app (KServe's, or a bare one in tests).
        runtime: a loaded runtime.
        admin_token: bearer token of ``/admin``; ``None`` disables it.
        api_keys: the keys the OpenAI routes require; open when ``None``.
    """
    app.include_router(openai_router(runtime, api_keys=api_keys))
    app.include_router(adapters_admin_router(runtime, admin_token))
    app.include_router(routes_admin_router(runtime.routes, admin_token, runtime.has_adapter))
    app.include_router(faults_admin_router(runtime.faults, admin_token))
    app.include_router(health_router(runtime))
    served = list(app.router.routes)

    def drop_later_routes() -> None:
        app.router.routes[:] = served

    app.router.add_event_handler("startup", drop_later_routes)
    app.add_exception_handler(HTTPException, allow_every_method)
