"""The lorafleet serving runtime: one base model and many LoRA adapters behind KServe.

:class:`LorafleetRuntime` is a ``kserve.Model``; ``load()`` builds a
:class:`~lorafleet.generation.Generator` and admits every adapter through the checks of
:mod:`lorafleet.serve.adapters`. Requests pass through a :class:`MicroBatcher`: those that
arrive within a few milliseconds of each other share one mixed-adapter ``generate`` call
(every decode step batched across them), which runs on a worker thread so the event loop
keeps serving. The queue is bounded (a full queue answers 429 with ``Retry-After``), each
request has a deadline (503 past it), and rows whose client went away stop decoding.
Adapter loads and unloads at runtime run on the same worker thread, between batches.

KServe serves v1/v2 health, readiness, metadata and ``/metrics``; the OpenAI-compatible
endpoints (:mod:`lorafleet.serve.openai_api`), the admin API (:mod:`lorafleet.serve.admin`)
and the route admin (:mod:`lorafleet.serve.router`) are mounted on KServe's FastAPI app.

Run it with ``python -m lorafleet.serve.runtime --base DIR --adapter NAME=SOURCE ...``
(or ``lorafleet serve``). Tests and the pipeline use :func:`run_server_subprocess`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from kserve import Model, ModelServer

from lorafleet.errors import LorafleetError
from lorafleet.generation import GenerationRequest, GenerationResult, Generator, LoraBackend
from lorafleet.serve.adapters import (
    AdapterInfo,
    AdapterRejected,
    BaseModelInfo,
    check_adapter_files,
    check_changes_output,
    resolve_source,
    validate_name,
)
from lorafleet.serve.batching import (
    MAX_BATCH_SIZE,
    MAX_WAIT_S,
    DeltaCallback,
    MicroBatcher,
    Overloaded,
    run_subset,
)
from lorafleet.serve.faults import FaultTable
from lorafleet.serve.metrics import ServingMetrics
from lorafleet.serve.router import RouteTable

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = [
    "LorafleetRuntime",
    "MicroBatcher",
    "Overloaded",
    "build_runtime",
    "main",
    "mount",
    "run_server_subprocess",
    "serve",
    "wait_ready",
]


class LorafleetRuntime(Model):
    """A KServe model serving one base model and its LoRA adapters.

    Args:
        name: the base model's served name: its KServe model name and OpenAI ``model`` id.
        base_dir: the base model directory (or hub id).
        adapters: adapter name (its OpenAI ``model`` id) -> adapter source (directory,
            ``pvc://``, ``s3://``, ``gs://``); each must pass the admission checks.
        max_batch_size: the most requests in one generate call.
        max_wait_s: how long a request waits for others to share its batch.
        max_queue: the most requests waiting for a batch (more get 429).
        request_timeout_s: a request's deadline, queueing included (later: 503).
        max_rank: the largest LoRA rank admitted.
        require_lineage: refuse adapters without ``lineage.json``.
        adapter_cache: where s3:// and gs:// adapters are downloaded.
        routes: public model name -> weighted adapter versions.
        metrics: where to count; a fresh registry when ``None``.
        faults: injected faults for canary drills (:mod:`lorafleet.serve.faults`); none
            when ``None``.
        probe: the user message of the "adapter changes the output" check.
        lora_backend: ``"batched"`` (stacked adapters, one pass per LoRA layer) or
            ``"peft"`` (PEFT's per-adapter loop, the reference); see :class:`Generator`.

    Raises:
        LorafleetError: if an adapter has the base model's name or an invalid name.
    """

    def __init__(
        self,
        name: str,
        base_dir: str | Path,
        adapters: Mapping[str, str | Path],
        max_batch_size: int = MAX_BATCH_SIZE,
        max_wait_s: float = MAX_WAIT_S,
        *,
        max_queue: int = 256,
        request_timeout_s: float = 120.0,
        max_rank: int = 64,
        require_lineage: bool = False,
        adapter_cache: str | Path | None = None,
        routes: RouteTable | None = None,
        metrics: ServingMetrics | None = None,
        faults: FaultTable | None = None,
        probe: str = "Write a short answer.",
        lora_backend: LoraBackend = "batched",
    ) -> None:
        super().__init__(name)
        if name in adapters:
            raise LorafleetError(
                f"adapter {name!r} has the base model's served name; rename one of them"
            )
        for adapter in adapters:
            validate_name(adapter)
        self.base_dir = base_dir
        self.adapters: dict[str, Path] = {}  # served name -> local directory
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.max_rank = max_rank
        self.require_lineage = require_lineage
        self.routes = routes or RouteTable()
        self.metrics = metrics or ServingMetrics()
        self.faults = faults or FaultTable()
        self.batcher: MicroBatcher | None = None
        self._sources = dict(adapters)
        self._probe = probe
        self.lora_backend = lora_backend
        self._cache = Path(adapter_cache or tempfile.mkdtemp(prefix="lorafleet-adapters-"))
        self._infos: dict[str, AdapterInfo] = {}
        self._keys: dict[str, str] = {}  # served name -> generator key of the serving version
        self._versions = itertools.count(1)
        self._generator: Generator | None = None
        self._base_info: BaseModelInfo | None = None
        self._base_logits: Any = None

    def load(self) -> bool:
        """Load the base (bf16 on a GPU) and admit every adapter.

        Raises:
            AdapterRejected: if a startup adapter fails a check.
        """
        import torch

        from lorafleet.base import fingerprint_model

        cuda = torch.cuda.is_available()
        self._generator = Generator(
            self.base_dir,
            device="cuda" if cuda else "cpu",
            dtype=torch.bfloat16 if cuda else None,
            lora_backend=self.lora_backend,
        )
        self._base_info = BaseModelInfo.from_model(
            self._generator.model, fingerprint_model(self.base_dir)
        )
        self._base_logits = self._generator.next_token_logits(self._probe_request(None))
        for name, source in self._sources.items():
            self._install(self._check(name, source))
        self.batcher = MicroBatcher(
            self._generator,
            self.max_batch_size,
            self.max_wait_s,
            max_queue=self.max_queue,
            run_batch=self._run_batch,
        )
        self.metrics.track_queue(lambda: self.batcher.queue_depth)
        self.ready = True
        return self.ready

    def stop(self) -> None:
        """Called by KServe on shutdown."""
        if self.batcher is not None:
            self.batcher.close()
        super().stop()

    def has_adapter(self, name: str) -> bool:
        """Whether an adapter of that served name is loaded."""
        return name in self._keys

    def adapter_for(self, model: str) -> str | None:
        """The adapter behind an OpenAI ``model`` id; ``None`` for the base.

        Raises:
            KeyError: if neither the base nor any adapter has that name.
        """
        if model == self.name:
            return None
        if model not in self._keys:
            raise KeyError(model)
        return model

    def adapter_table(self) -> list[dict[str, Any]]:
        """The served adapters, JSON-ready: name, path, rank, base fingerprint."""
        return [
            {
                "name": info.name,
                "path": str(info.path),
                "rank": info.rank,
                "target_modules": list(info.target_modules),
                "base_fingerprint": info.base_fingerprint,
            }
            for info in self._infos.values()
        ]

    async def generate(
        self, request: GenerationRequest, on_delta: DeltaCallback | None = None
    ) -> GenerationResult:
        """Generate through the micro-batcher; see :meth:`MicroBatcher.submit`."""
        if self.batcher is None:
            raise RuntimeError(f"runtime {self.name!r} is not loaded")
        return await self.batcher.submit(request, on_delta, self.request_timeout_s)

    async def load_adapter(self, name: str, source: str | Path) -> AdapterInfo:
        """Check and load an adapter while serving; a loaded version of ``name`` is replaced
        only once the new one passed every check.

        Raises:
            AdapterRejected: if a check fails (the served version, if any, stays).
        """
        if self.batcher is None:
            raise RuntimeError(f"runtime {self.name!r} is not loaded")
        # Download and file checks off the worker thread; only the load pauses batches.
        info = await asyncio.to_thread(self._check, name, source)
        await self.batcher.run_exclusive(self._install, info)
        return info

    async def unload_adapter(self, name: str) -> None:
        """Unload an adapter; requests already queued for it fail with 404.

        Raises:
            KeyError: if no adapter of that name is loaded.
        """
        if name not in self._keys:
            raise KeyError(name)
        await self.batcher.run_exclusive(self._uninstall, name)

    def _probe_request(self, key: str | None) -> GenerationRequest:
        return GenerationRequest(messages=[{"role": "user", "content": self._probe}], adapter=key)

    def _check(self, name: str, source: str | Path) -> AdapterInfo:
        validate_name(name)
        if name == self.name:
            raise AdapterRejected(name, "name", "is the base model's served name")
        path = resolve_source(name, source, self._cache)
        return check_adapter_files(name, path, self._base_info, self.max_rank, self.require_lineage)

    def _install(self, info: AdapterInfo) -> None:
        """Load the weights under a fresh key, probe them, then switch the name to them."""
        key = f"{info.name}__{next(self._versions)}"
        try:
            self._generator.add_adapter(key, info.path)
        except Exception as exc:  # PEFT's own errors: one line is the useful part
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise AdapterRejected(info.name, "load", detail) from None
        try:
            check_changes_output(
                info.name,
                self._base_logits,
                self._generator.next_token_logits(self._probe_request(key)),
            )
        except AdapterRejected:
            self._generator.remove_adapter(key)
            raise
        old = self._keys.get(info.name)
        self._keys[info.name] = key
        self._infos[info.name] = info
        self.adapters[info.name] = info.path
        if old is not None:
            self._generator.remove_adapter(old)

    def _uninstall(self, name: str) -> None:
        key = self._keys.pop(name)
        del self._infos[name], self.adapters[name]
        self._generator.remove_adapter(key)

    def _run_batch(
        self,
        requests: Sequence[GenerationRequest],
        on_delta: Callable[[int, str], None],
        is_cancelled: Callable[[int], bool],
    ) -> list[GenerationResult | Exception]:
        """Map served names to the keys of their serving versions and run the batch; a
        request whose adapter was unloaded since it queued gets an error of its own."""
        out: list[GenerationResult | Exception] = [
            LorafleetError(f"adapter {r.adapter!r} is not loaded") for r in requests
        ]
        live = [i for i, r in enumerate(requests) if r.adapter is None or r.adapter in self._keys]
        mapped = [dataclasses.replace(r, adapter=self._keys.get(r.adapter)) for r in requests]
        for i, result in run_subset(self._generator.generate, mapped, live, on_delta, is_cancelled):
            out[i] = result
        return out


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


def build_runtime(
    base_dir: str | Path,
    adapters: Mapping[str, str | Path],
    name: str = "base",
    max_batch_size: int = MAX_BATCH_SIZE,
    max_wait_s: float = MAX_WAIT_S,
    **options: Any,
) -> LorafleetRuntime:
    """Build and load a runtime (arguments and ``options`` as for :class:`LorafleetRuntime`)."""
    runtime = LorafleetRuntime(
        name, base_dir, adapters, max_batch_size=max_batch_size, max_wait_s=max_wait_s, **options
    )
    runtime.load()
    return runtime


def serve(
    base_dir: str | Path,
    adapters: Mapping[str, str | Path],
    host: str = "127.0.0.1",
    port: int = 8080,
    name: str = "base",
    max_batch_size: int = MAX_BATCH_SIZE,
    max_wait_s: float = MAX_WAIT_S,
    admin_token: str | None = None,
    **options: Any,
) -> None:
    """Load a runtime and serve it until SIGINT/SIGTERM.

    Args:
        base_dir: the base model directory (or hub id).
        adapters: adapter name -> adapter source.
        host: the address to listen on; ``0.0.0.0`` inside a cluster pod.
        port: the HTTP port (KServe v1/v2, ``/metrics``, ``/openai/v1`` and ``/admin``).
        name: the base model's served name.
        max_batch_size: the most requests in one generate call.
        max_wait_s: how long a request waits for others to share its batch.
        admin_token: bearer token of the admin API; ``None`` disables it.
        **options: further :class:`LorafleetRuntime` keyword arguments.
    """
    from kserve.model_server import app
    from prometheus_client import REGISTRY

    # KServe's /metrics exposes the default registry: count there.
    options.setdefault("metrics", ServingMetrics(REGISTRY))
    runtime = build_runtime(base_dir, adapters, name, max_batch_size, max_wait_s, **options)
    # KServe builds its routes on this module-level app when it starts; ours go in first.
    mount(app, runtime, admin_token)
    _HostModelServer(host=host, http_port=port, enable_grpc=False).start([runtime])


def mount(app: FastAPI, runtime: LorafleetRuntime, admin_token: str | None) -> None:
    """Add the runtime's own routes to a FastAPI app: ``/openai/v1``, ``/admin/adapters``,
    ``/admin/routes`` and ``/admin/faults`` (KServe adds health, v1/v2 and ``/metrics`` itself).

    Args:
        app: the app (KServe's, or a bare one in tests).
        runtime: a loaded runtime.
        admin_token: bearer token of ``/admin``; ``None`` disables it.
    """
    from lorafleet.serve.admin import adapters_admin_router
    from lorafleet.serve.faults import faults_admin_router
    from lorafleet.serve.openai_api import openai_router
    from lorafleet.serve.router import routes_admin_router

    app.include_router(openai_router(runtime))
    app.include_router(adapters_admin_router(runtime, admin_token))
    app.include_router(routes_admin_router(runtime.routes, admin_token, runtime.has_adapter))
    app.include_router(faults_admin_router(runtime.faults, admin_token))


def wait_ready(url: str, timeout: float = 120.0, process: subprocess.Popen | None = None) -> None:
    """Wait until the server at ``url`` answers ``GET /v2/health/ready`` with 200.

    Args:
        url: the server's base URL.
        timeout: seconds to wait.
        process: the server's process, if known: waiting stops when it exits.

    Raises:
        TimeoutError: if the server is not ready in time.
        RuntimeError: if ``process`` exits first.
    """
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5.0) as client:
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {process.returncode} before it was ready"
                )
            with contextlib.suppress(httpx.TransportError):
                if client.get(f"{url}/v2/health/ready").status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} was not ready after {timeout:.0f} s")
            time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def run_server_subprocess(
    base_dir: str | Path,
    adapters: Mapping[str, str | Path],
    port: int | None = None,
    name: str = "base",
    timeout: float = 120.0,
    *,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """Run the runtime in a child process on 127.0.0.1 for the length of a ``with`` block.

    Args:
        base_dir: the base model directory.
        adapters: adapter name -> adapter source.
        port: the port; a free one when ``None``.
        name: the base model's served name.
        timeout: seconds to wait for readiness.
        extra_args: more command-line options (see :func:`main`), e.g. ``["--max-queue", "8"]``.
        env: variables added to the child's environment (e.g. ``LORAFLEET_ADMIN_TOKEN``).

    Yields:
        The server's base URL, e.g. ``http://127.0.0.1:41234``.

    Raises:
        TimeoutError: if the server is not ready in time (the server's log is attached as a note).
        RuntimeError: if the server exits before it is ready (likewise).
    """
    port = port or _free_port()
    cmd = [sys.executable, "-m", "lorafleet.serve.runtime", "--base", str(base_dir), "--name", name]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *extra_args]
    for adapter, path in adapters.items():
        cmd += ["--adapter", f"{adapter}={path}"]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        try:
            try:
                wait_ready(url, timeout, process)
            except (TimeoutError, RuntimeError) as exc:
                log.seek(0)
                exc.add_note("server log (end):\n" + log.read()[-4000:].decode(errors="replace"))
                raise
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m lorafleet.serve.runtime --base DIR [--adapter NAME=DIR ...]``.

    The same options as ``lorafleet serve`` (:func:`lorafleet.cli.serve`, one definition);
    a user mistake is one ``error:`` line and exit code 2.
    """
    from lorafleet.cli import main as cli_main
    from lorafleet.cli import serve_app

    cli_main(
        serve_app,
        args=None if argv is None else list(argv),
        prog_name="python -m lorafleet.serve.runtime",
    )


if __name__ == "__main__":
    main()
