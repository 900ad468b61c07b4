"""Micro-batching: requests that arrive close together share one mixed-adapter generate call.

:class:`MicroBatcher` holds a bounded queue in front of a single worker thread. The
first request of a batch waits a few milliseconds for company; the batch then runs as one
call in which every decode step is batched across its requests. A full queue raises
:class:`Overloaded` (the server's 429), and a request whose caller stopped waiting
(deadline, disconnect) is dropped before its batch starts or stops decoding mid-batch.
A batch whose call raises is split and run again (:func:`run_isolated`), so the exception
reaches only the requests that raise it on their own; their batch-mates are answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from lorafleet.engine.generation import GenerationRequest, GenerationResult, Generator

__all__ = [
    "MAX_BATCH_SIZE",
    "MAX_WAIT_S",
    "BatchRunner",
    "DeltaCallback",
    "MicroBatcher",
    "Overloaded",
    "RetryDiverged",
    "run_isolated",
    "run_subset",
]

# Defaults of the runtime, its command line and ServingSpec.max_batch_size (equal by test).
# A cap: light load makes small batches anyway. On bench/serve_bench.py's burst of 128
# requests over 8 adapters (docs/benchmarks.md#serving), 64 gives 8-19 % more tokens/s
# than 32 and the lower p99, at a 7-15 % higher median; 128 is no steady gain and, as one
# batch for the whole burst, has a higher median latency.
MAX_BATCH_SIZE = 64
# The first request of a batch waits this long for company (see docs/serving.md).
MAX_WAIT_S = 0.01

DeltaCallback = Callable[[str], None]
# run_batch(requests, on_delta(i, text), is_cancelled(i)) -> one result or error per request.
BatchRunner = Callable[
    [Sequence[GenerationRequest], Callable[[int, str], None], Callable[[int], bool]],
    Sequence[GenerationResult | Exception],
]


def run_subset(
    run_batch: BatchRunner,
    requests: Sequence[GenerationRequest],
    keep: Sequence[int],
    on_delta: Callable[[int, str], None],
    is_cancelled: Callable[[int], bool],
) -> list[tuple[int, GenerationResult | Exception]]:
    """Run only ``requests[i] for i in keep``, with callbacks and results in the full
    batch's indices: ``[(i, result), ...]``."""
    if not keep:
        return []
    results = run_batch(
        [requests[i] for i in keep],
        lambda j, text: on_delta(keep[j], text),
        lambda j: is_cancelled(keep[j]),
    )
    return list(zip(keep, results, strict=True))


class RetryDiverged(RuntimeError):
    """A streamed request, run again alone after its batch failed, did not repeat the text it
    had already streamed; its client cannot be given a consistent answer."""


def run_isolated(
    run_batch: BatchRunner,
    requests: Sequence[GenerationRequest],
    keep: Sequence[int],
    on_delta: Callable[[int, str], None],
    is_cancelled: Callable[[int], bool],
) -> list[tuple[int, GenerationResult | Exception]]:
    """:func:`run_subset`, but a call that raises is split in halves and each half run again,
    down to single requests: an exception reaches only the rows that raise it alone.

    One bad row among ``n`` costs about ``2 log2 n`` extra calls, and a batch too big for the
    device (out of memory) is retried in halves. Decoding is greedy, so a row run again
    repeats its tokens; the text it streamed before the failure is not sent twice, and a
    row whose retry does not repeat it gets :class:`RetryDiverged` instead of its result.
    Rows whose caller went away (``is_cancelled``) are not run again.

    Returns:
        ``[(i, result or exception), ...]`` in the full batch's indices, for the rows run.
    """
    streamed: dict[int, str] = {}  # text handed to on_delta so far, over all attempts
    attempt: dict[int, str] = {}  # text of the row's current attempt

    def deliver(i: int, text: str) -> None:
        attempt[i] += text
        sent = streamed.get(i, "")
        if len(attempt[i]) > len(sent) and attempt[i].startswith(sent):
            on_delta(i, attempt[i][len(sent) :])
            streamed[i] = attempt[i]

    def run(rows: list[int]) -> list[tuple[int, GenerationResult | Exception]]:
        rows = [i for i in rows if not is_cancelled(i)]
        attempt.update(dict.fromkeys(rows, ""))
        try:
            return run_subset(run_batch, requests, rows, deliver, is_cancelled)
        except Exception as exc:
            if len(rows) == 1:
                return [(rows[0], exc)]
            half = len(rows) // 2
            return run(rows[:half]) + run(rows[half:])

    def checked(i: int, result: GenerationResult | Exception) -> GenerationResult | Exception:
        if isinstance(result, Exception) or result.text.startswith(streamed.get(i, "")):
            return result
        return RetryDiverged(
            "the answer changed when the request was run again after its batch failed"
        )

    return [(i, checked(i, result)) for i, result in run(list(keep))]


class Overloaded(Exception):
    """The request queue is full; ``retry_after_s`` estimates when it has room again."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"server overloaded: request queue full, retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass
class _Pending:
    request: GenerationRequest
    on_delta: DeltaCallback | None
    future: asyncio.Future[GenerationResult]


class MicroBatcher:
    """Runs requests that arrive close together as one mixed-adapter generate call.

    The first request of a batch waits up to ``max_wait_s`` for others, up to
    ``max_batch_size`` in all; requests that queue while a batch runs form the next one.
    Batches run one at a time on a single worker thread (the generator is not
    thread-safe, and a batch is already the parallel unit). Requests whose caller stopped
    waiting (timeout, disconnect) are dropped before their batch starts, and stop decoding
    if it already has.

    Args:
        generator: the generator that runs the batches.
        max_batch_size: the most requests in one batch.
        max_wait_s: how long the first request of a batch waits for company.
        max_queue: the most requests waiting; one more raises :class:`Overloaded`.
        run_batch: runs one batch; ``generator.generate`` when ``None``.
    """

    def __init__(
        self,
        generator: Generator,
        max_batch_size: int = MAX_BATCH_SIZE,
        max_wait_s: float = MAX_WAIT_S,
        max_queue: int = 256,
        run_batch: BatchRunner | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(
                f"max_batch_size and max_queue must be at least 1, got {max_batch_size}, "
                f"{max_queue}"
            )
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.batch_sizes: Counter[int] = Counter()  # batch size -> generate calls
        self.last_batch_s = 0.1
        self._run_batch_fn = run_batch or generator.generate
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_queue)
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafleet-generate")

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch."""
        return self._queue.qsize()

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained, from the last batch's duration."""
        return max(1, math.ceil(self.queue_depth / self.max_batch_size * self.last_batch_s))

    async def submit(
        self,
        request: GenerationRequest,
        on_delta: DeltaCallback | None = None,
        timeout_s: float | None = None,
    ) -> GenerationResult:
        """Queue one request and wait for its result.

        Args:
            request: what to generate.
            on_delta: called on the event loop with each piece of new final text.
            timeout_s: the longest wait, queueing included; ``None`` waits forever.

        Returns:
            The request's result.

        Raises:
            Overloaded: if the queue is full.
            TimeoutError: if ``timeout_s`` passed first (the request's work is dropped).
        """
        # Cancelling this coroutine (a client that went away) cancels the future too.
        return await asyncio.wait_for(self.enqueue(request, on_delta), timeout_s)

    def enqueue(
        self, request: GenerationRequest, on_delta: DeltaCallback | None = None
    ) -> asyncio.Future[GenerationResult]:
        """Queue one request now (call on the event loop); cancel the future to drop it.

        Raises:
            Overloaded: if the queue is full.
        """
        self._ensure_worker()
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(request, on_delta, future))
        except asyncio.QueueFull:
            raise Overloaded(self.retry_after_s()) from None
        return future

    async def run_exclusive(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the worker thread, between two batches."""
        self._ensure_worker()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        """Stop the worker; requests not yet answered stay unanswered."""
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _ensure_worker(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._run())

    async def _next_live(self) -> _Pending:
        while True:
            pending = await self._queue.get()
            if not pending.future.done():  # done: timed out or cancelled while queued
                return pending

    async def _next_batch(self) -> list[_Pending]:
        batch = [await self._next_live()]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.max_wait_s):
                while len(batch) < self.max_batch_size:
                    batch.append(await self._next_live())
        return batch

    async def _run_batch(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()

        def on_delta(i: int, text: str) -> None:  # runs on the worker thread
            if batch[i].on_delta is not None:
                loop.call_soon_threadsafe(batch[i].on_delta, text)

        def is_cancelled(i: int) -> bool:  # a plain read of the future's state
            return batch[i].future.done()

        def run() -> list[tuple[int, GenerationResult | Exception]]:  # on the worker thread
            # Rows whose caller left while the batch waited for the thread are dropped here.
            live = [i for i, p in enumerate(batch) if not p.future.done()]
            if live:
                self.batch_sizes[len(live)] += 1
            requests = [p.request for p in batch]
            return run_isolated(self._run_batch_fn, requests, live, on_delta, is_cancelled)

        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, run)
        except Exception as exc:
            results = [(i, exc) for i in range(len(batch))]
        self.last_batch_s = time.perf_counter() - start
        for i, result in results:
            pending = batch[i]
            if pending.future.done():  # the caller went away
                continue
            if isinstance(result, Exception):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)

    async def _run(self) -> None:
        while True:
            await self._run_batch(await self._next_batch())
