"""The lorafleet serving model: one base model and many LoRA adapters, a ``kserve.Model``.

:class:`LorafleetRuntime`'s ``load()`` builds a
:class:`~lorafleet.engine.generation.Generator` and admits every adapter through the checks of
:mod:`lorafleet.serve.adapters`. Requests pass through a
:class:`~lorafleet.serve.batching.ContinuousBatcher`: a request joins the running
mixed-adapter batch at its next decode step and leaves it when it finishes, on a worker
thread so the event loop keeps serving; the time to its first token is observed in
:class:`~lorafleet.serve.metrics.ServingMetrics`. The queue is bounded (a full queue
answers 429 with ``Retry-After``), each request has a deadline (503 past it), and rows
whose client went away leave the batch. A request whose forward pass raises fails alone.
Adapter loads and unloads at runtime run on the same worker thread, between steps:
requests already running on a replaced version finish on it, and those running on an
unloaded adapter fail with a one-line error.

:func:`build_runtime` is the one factory; :mod:`lorafleet.serve.server` serves the result.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from kserve import Model

from lorafleet.engine.generation import (
    BASE_ADAPTER,
    GenerationRequest,
    GenerationResult,
    Generator,
    LoraBackend,
)
from lorafleet.errors import LorafleetError
from lorafleet.serve.adapters import (
    AdapterInfo,
    AdapterRejected,
    BaseModelInfo,
    admit_files,
    check_changes_output,
    validate_name,
)
from lorafleet.serve.batching import (
    MAX_BATCH_SIZE,
    MAX_WAIT_S,
    PREFILL_CHUNK_TOKENS,
    ContinuousBatcher,
    DeltaCallback,
)
from lorafleet.serve.faults import FaultTable
from lorafleet.serve.limits import RequestLimits
from lorafleet.serve.metrics import ServingMetrics
from lorafleet.serve.routes import RouteTable

__all__ = ["LorafleetRuntime", "build_runtime"]


class LorafleetRuntime(Model):
    """A KServe model serving one base model and its LoRA adapters.

    Args:
        name: the base model's served name: its KServe model name and OpenAI ``model`` id.
        base_dir: the base model directory (or hub id).
        adapters: adapter name (its OpenAI ``model`` id) -> adapter source (directory,
            ``pvc://``, ``s3://``, ``gs://``); each must pass the admission checks.
        max_batch_size: the most requests decoding at once.
        max_wait_s: when nothing runs, how long a request waits for others to share its
            prefill.
        max_queue: the most requests waiting to join the batch (more get 429).
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
        limits: what one completion request may ask for; the defaults when ``None``.
        revision: the base's hub revision (the spec's ``base.revision``); ``None`` for a
            local directory.
        dtype: the base's weight dtype (the spec's ``base.dtype``); ``"auto"``: bf16 on a
            GPU that supports it, else float32 (:func:`lorafleet.engine.devices.pick_dtype`).
        prefill_chunk_tokens: the prompt tokens prefilled per step (padding included): the
            longest a running request waits between two of its tokens.
        threads: torch's CPU threads (``torch.set_num_threads``), set by ``load()``; ``None``
            leaves them as they are. The HTTP event loop and the decoding thread share this
            process: intra-op threads on every core stall whenever the event loop runs.

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
        limits: RequestLimits | None = None,
        revision: str | None = None,
        dtype: str = "auto",
        prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS,
        threads: int | None = None,
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
        self.limits = limits or RequestLimits()
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.threads = threads
        self.batcher: ContinuousBatcher | None = None
        self._sources = dict(adapters)
        self._probe = probe
        self.lora_backend = lora_backend
        self.revision = revision
        self.dtype = dtype
        self._cache = Path(adapter_cache or tempfile.mkdtemp(prefix="lorafleet-adapters-"))
        self._infos: dict[str, AdapterInfo] = {}
        self._keys: dict[str, str] = {}  # served name -> generator key of the serving version
        # Replaced versions still running requests: generator key -> served name.
        self._retiring: dict[str, str] = {}
        self._versions = itertools.count(1)
        self._generator: Generator | None = None
        self._base_info: BaseModelInfo | None = None
        self._base_logits: Any = None

    def load(self) -> bool:
        """Load the base (on a GPU when one is visible, bf16 where it supports it) and admit
        every adapter.

        Raises:
            AdapterRejected: if a startup adapter fails a check.
            GpuNotVisibleError: the pod was given GPUs (``LORAFLEET_GPUS``) but sees none.
        """
        from lorafleet.base import fingerprint_model

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self._generator = Generator(
            self.base_dir,
            dtype=self.dtype,
            lora_backend=self.lora_backend,
            revision=self.revision,
        )
        self._base_info = BaseModelInfo.from_model(
            self._generator.model, fingerprint_model(self.base_dir)
        )
        self._base_logits = self._generator.next_token_logits(self._probe_request(None))
        for name, source in self._sources.items():
            self._install(self._check(name, source))
        self.batcher = ContinuousBatcher(
            self._generator,
            self.max_batch_size,
            self.max_wait_s,
            max_queue=self.max_queue,
            prefill_chunk_tokens=self.prefill_chunk_tokens,
            resolve=self._resolve,
            on_first_token=self._observe_first_token,
        )
        self.batcher.after_each_step(self._release_retired)
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
        return [info.as_dict() for info in self._infos.values()]

    async def generate(
        self, request: GenerationRequest, on_delta: DeltaCallback | None = None
    ) -> GenerationResult:
        """Generate through the batcher; see :meth:`ContinuousBatcher.submit`."""
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
        # Download and file checks off the worker thread; only the load pauses decoding.
        info = await asyncio.to_thread(self._check, name, source)
        await self.batcher.run_exclusive(self._install, info)
        return info

    async def unload_adapter(self, name: str) -> None:
        """Unload an adapter; requests queued or running for it fail with 404.

        Raises:
            KeyError: if no adapter of that name is loaded.
        """
        if name not in self._keys:
            raise KeyError(name)
        await self.batcher.run_exclusive(self._uninstall, name)

    def _probe_request(self, key: str | None) -> GenerationRequest:
        return GenerationRequest(messages=[{"role": "user", "content": self._probe}], adapter=key)

    def _check(self, name: str, source: str | Path) -> AdapterInfo:
        return admit_files(
            name,
            source,
            self._base_info,
            self.max_rank,
            base_name=self.name,
            cache_dir=self._cache,
            require_lineage=self.require_lineage,
        )

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
            # Requests running on the old version finish on it: it goes once they are done.
            self._retiring[old] = info.name
            self._release_retired()

    def _release_retired(self) -> None:
        """Unload replaced versions that no running request uses any more."""
        if not self._retiring:
            return
        in_use = self.batcher.keys_in_use() if self.batcher is not None else set()
        for key in [k for k in self._retiring if k not in in_use]:
            del self._retiring[key]
            self._generator.remove_adapter(key)

    def _uninstall(self, name: str) -> None:
        key = self._keys.pop(name)
        del self._infos[name], self.adapters[name]
        keys = {key, *(k for k, served in self._retiring.items() if served == name)}
        self.batcher.abort(keys, LorafleetError(f"adapter {name!r} was unloaded"))
        for k in keys:
            self._retiring.pop(k, None)
            self._generator.remove_adapter(k)

    def _resolve(self, request: GenerationRequest) -> str:
        """The generator key of the version serving a request's adapter, as it is admitted.

        Raises:
            LorafleetError: if the adapter was unloaded since the request queued.
        """
        if request.adapter is None:
            return BASE_ADAPTER
        if request.adapter not in self._keys:
            raise LorafleetError(f"adapter {request.adapter!r} is not loaded")
        return self._keys[request.adapter]

    def _observe_first_token(self, request: GenerationRequest, seconds: float) -> None:
        self.metrics.observe_first_token(request.adapter or self.name, seconds)


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
