"""The lorafleet serving runtime: one base model and many LoRA adapters behind KServe.

:class:`LorafleetRuntime` is a ``kserve.Model``; ``load()`` builds a
:class:`~lorafleet.generation.Generator` holding every adapter. Requests pass through a
:class:`MicroBatcher`: those that arrive within a few milliseconds of each other share one
mixed-adapter ``generate`` call, which runs on a worker thread so the event loop keeps
serving. KServe serves v1/v2 health, readiness and metadata; the OpenAI-compatible
endpoints (:mod:`lorafleet.serve.openai_api`) are mounted on KServe's FastAPI app.

Run it with ``python -m lorafleet.serve.runtime --base DIR --adapter NAME=DIR ...``
(or ``lorafleet serve``). Tests and the pipeline use :func:`run_server_subprocess`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
from kserve import Model, ModelServer

from lorafleet.errors import LorafleetError
from lorafleet.generation import GenerationRequest, GenerationResult, Generator

__all__ = [
    "LorafleetRuntime",
    "MicroBatcher",
    "build_runtime",
    "main",
    "run_server_subprocess",
    "serve",
    "wait_ready",
]

DeltaCallback = Callable[[str], None]


@dataclass
class _Pending:
    request: GenerationRequest
    on_delta: DeltaCallback | None
    future: asyncio.Future[GenerationResult]


class MicroBatcher:
    """Runs requests that arrive close together as one :meth:`Generator.generate` call.

    The first request of a batch waits up to ``max_wait_s`` for others, up to
    ``max_batch_size`` in all; requests that queue while a batch runs form the next one.
    Batches run one at a time on a single worker thread (the generator is not
    thread-safe, and a batch is already the parallel unit).

    Args:
        generator: the generator that runs the batches.
        max_batch_size: the most requests in one batch.
        max_wait_s: how long the first request of a batch waits for company.
    """

    def __init__(
        self, generator: Generator, max_batch_size: int = 8, max_wait_s: float = 0.01
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.batch_sizes: Counter[int] = Counter()  # batch size -> generate calls
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafleet-generate")

    async def submit(
        self, request: GenerationRequest, on_delta: DeltaCallback | None = None
    ) -> GenerationResult:
        """Queue one request and wait for its result.

        Args:
            request: what to generate.
            on_delta: called on the event loop with each piece of new final text.

        Returns:
            The request's result.
        """
        if self._worker is None:
            self._worker = asyncio.create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(request, on_delta, future))
        return await future

    def close(self) -> None:
        """Stop the worker; requests not yet answered stay unanswered."""
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _next_batch(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.max_wait_s):
                while len(batch) < self.max_batch_size:
                    batch.append(await self._queue.get())
        return batch

    async def _run_batch(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()

        def on_delta(i: int, text: str) -> None:  # runs on the worker thread
            if batch[i].on_delta is not None:
                loop.call_soon_threadsafe(batch[i].on_delta, text)

        self.batch_sizes[len(batch)] += 1
        try:
            results = await loop.run_in_executor(
                self._executor, self.generator.generate, [p.request for p in batch], on_delta
            )
        except Exception as exc:
            for pending in batch:
                if not pending.future.done():  # done: the caller went away
                    pending.future.set_exception(exc)
            return
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)

    async def _run(self) -> None:
        while True:
            await self._run_batch(await self._next_batch())


class LorafleetRuntime(Model):
    """A KServe model serving one base model and its LoRA adapters.

    Args:
        name: the base model's served name: its KServe model name and OpenAI ``model`` id.
        base_dir: the base model directory (or hub id).
        adapters: adapter name (its OpenAI ``model`` id) -> adapter directory.
        max_batch_size: the most requests in one generate call.
        max_wait_s: how long a request waits for others to share its batch.

    Raises:
        LorafleetError: if an adapter has the base model's name.
    """

    def __init__(
        self,
        name: str,
        base_dir: str | Path,
        adapters: Mapping[str, str | Path],
        max_batch_size: int = 8,
        max_wait_s: float = 0.01,
    ) -> None:
        super().__init__(name)
        if name in adapters:
            raise LorafleetError(
                f"adapter {name!r} has the base model's served name; rename one of them"
            )
        self.base_dir = base_dir
        self.adapters = {n: Path(p) for n, p in adapters.items()}
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.batcher: MicroBatcher | None = None

    def load(self) -> bool:
        """Load the base model and every adapter (on the GPU when there is one)."""
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        generator = Generator(self.base_dir, self.adapters, device=device)
        self.batcher = MicroBatcher(generator, self.max_batch_size, self.max_wait_s)
        self.ready = True
        return self.ready

    def stop(self) -> None:
        """Called by KServe on shutdown."""
        if self.batcher is not None:
            self.batcher.close()
        super().stop()

    def adapter_for(self, model: str) -> str | None:
        """The adapter behind an OpenAI ``model`` id; ``None`` for the base.

        Raises:
            KeyError: if neither the base nor any adapter has that name.
        """
        if model == self.name:
            return None
        if model not in self.adapters:
            raise KeyError(model)
        return model

    async def generate(
        self, request: GenerationRequest, on_delta: DeltaCallback | None = None
    ) -> GenerationResult:
        """Generate through the micro-batcher; see :meth:`MicroBatcher.submit`."""
        if self.batcher is None:
            raise RuntimeError(f"runtime {self.name!r} is not loaded")
        return await self.batcher.submit(request, on_delta)


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
    max_batch_size: int = 8,
    max_wait_s: float = 0.01,
) -> LorafleetRuntime:
    """Build and load a runtime (arguments as for :class:`LorafleetRuntime`)."""
    runtime = LorafleetRuntime(
        name, base_dir, adapters, max_batch_size=max_batch_size, max_wait_s=max_wait_s
    )
    runtime.load()
    return runtime


def serve(
    base_dir: str | Path,
    adapters: Mapping[str, str | Path],
    host: str = "127.0.0.1",
    port: int = 8080,
    name: str = "base",
    max_batch_size: int = 8,
    max_wait_s: float = 0.01,
) -> None:
    """Load a runtime and serve it until SIGINT/SIGTERM.

    Args:
        base_dir: the base model directory (or hub id).
        adapters: adapter name -> adapter directory.
        host: the address to listen on; ``0.0.0.0`` inside a cluster pod.
        port: the HTTP port (KServe v1/v2 and ``/openai/v1``).
        name: the base model's served name.
        max_batch_size: the most requests in one generate call.
        max_wait_s: how long a request waits for others to share its batch.
    """
    from kserve.model_server import app

    from lorafleet.serve.openai_api import openai_router

    runtime = build_runtime(base_dir, adapters, name, max_batch_size, max_wait_s)
    # KServe builds its routes on this module-level app when it starts; ours go in first.
    app.include_router(openai_router(runtime))
    _HostModelServer(host=host, http_port=port, enable_grpc=False).start([runtime])


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
) -> Iterator[str]:
    """Run the runtime in a child process on 127.0.0.1 for the length of a ``with`` block.

    Args:
        base_dir: the base model directory.
        adapters: adapter name -> adapter directory.
        port: the port; a free one when ``None``.
        name: the base model's served name.
        timeout: seconds to wait for readiness.

    Yields:
        The server's base URL, e.g. ``http://127.0.0.1:41234``.

    Raises:
        TimeoutError: if the server is not ready in time (the server's log is attached as a note).
        RuntimeError: if the server exits before it is ready (likewise).
    """
    port = port or _free_port()
    cmd = [sys.executable, "-m", "lorafleet.serve.runtime", "--base", str(base_dir), "--name", name]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    for adapter, path in adapters.items():
        cmd += ["--adapter", f"{adapter}={path}"]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
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


def _adapter_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not (name and sep and path):
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m lorafleet.serve.runtime --base DIR [--adapter NAME=DIR ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m lorafleet.serve.runtime",
        description="Serve a base model and its LoRA adapters: KServe v1/v2 health and "
        "metadata, and an OpenAI-compatible API under /openai/v1 (model = adapter name).",
    )
    parser.add_argument("--base", required=True, help="base model directory (Hugging Face format)")
    parser.add_argument(
        "--adapter",
        type=_adapter_arg,
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a PEFT LoRA adapter, served as model NAME; repeat for more",
    )
    parser.add_argument(
        "--name", default="base", help="served name of the base model (default: %(default)s)"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 in a pod (default: %(default)s)",
    )
    parser.add_argument("--port", type=int, default=8080, help="HTTP port (default: %(default)s)")
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="most requests per batch (default: %(default)s)",
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=10.0,
        help="how long a request waits for others to share its batch (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    adapters = dict(args.adapter)
    if len(adapters) != len(args.adapter):
        parser.error("adapter names must be unique")
    try:
        serve(
            args.base,
            adapters,
            args.host,
            args.port,
            args.name,
            args.max_batch_size,
            args.max_wait_ms / 1000,
        )
    except LorafleetError as exc:
        parser.exit(2, f"error: {exc}\n")


if __name__ == "__main__":
    main()
