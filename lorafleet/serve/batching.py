"""Batching in the serving runtime: continuous batching, and the static micro-batcher.

:class:`ContinuousBatcher` is the runtime's: a worker thread runs a
:class:`~lorafleet.engine.continuous.StepEngine` one iteration at a time, so a request
joins the running batch at the next decode step and leaves it when it finishes, and the
prompts of newcomers are prefilled in chunks between decode steps. The queue of requests
not yet admitted is bounded: a full queue raises :class:`Overloaded` (the server's 429).
A request whose caller stopped waiting (deadline, disconnect) leaves at the next step. A
forward pass that raises is split and run again, so the exception reaches only the rows
that raise it on their own; their batch-mates are answered. Adapter loads and unloads
run on the worker thread between two steps (:meth:`ContinuousBatcher.run_exclusive`).

:class:`MicroBatcher` is the static batcher the runtime used before (and
``bench/serve_bench.py`` still measures): requests that arrive close together share one
mixed-adapter ``generate`` call, and new arrivals wait for the whole batch. A batch whose
call raises is split and run again (:func:`run_isolated`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from lorafleet.engine.continuous import DEFAULT_PREFILL_CHUNK_TOKENS, Job, StepEngine
from lorafleet.engine.generation import GenerationRequest, GenerationResult, Generator

__all__ = [
    "DELTA_INTERVAL_S",
    "MAX_BATCH_SIZE",
    "MAX_WAIT_S",
    "PREFILL_CHUNK_TOKENS",
    "BatchRunner",
    "ContinuousBatcher",
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
# The first request of a batch waits this long for company (see docs/serving.md); with
# continuous batching, only a request that finds the runtime idle waits.
MAX_WAIT_S = 0.01
# The prefill budget of one step, the runtime's --prefill-chunk-tokens.
PREFILL_CHUNK_TOKENS = DEFAULT_PREFILL_CHUNK_TOKENS
# Streamed text reaches the event loop at most this often (a first token at once): a
# request's tokens of that span go out as one chunk, so a busy server spends less of its
# event loop (shared with the decoding thread) per token. About two decode steps of a
# loaded CPU runtime; far below what a reader notices.
DELTA_INTERVAL_S = 0.02

log = logging.getLogger(__name__)

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


class _Batcher:
    """What both batchers share: :meth:`submit` waits for :meth:`enqueue`'s future."""

    def enqueue(
        self, request: GenerationRequest, on_delta: DeltaCallback | None = None
    ) -> asyncio.Future[GenerationResult]:
        raise NotImplementedError

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
            TimeoutError: if ``timeout_s`` passed first (the request's work is dropped, or
                it leaves its batch).
        """
        # Cancelling this coroutine (a client that went away) cancels the future too.
        return await asyncio.wait_for(self.enqueue(request, on_delta), timeout_s)


class MicroBatcher(_Batcher):
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


def _settle(future: asyncio.Future[Any], outcome: Any, failed: bool) -> None:
    """Answer a future on its loop, unless its caller went away."""
    if future.done():
        return
    if failed:
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _call_all(calls: list[tuple[Callable[..., Any], tuple[Any, ...] | list[str]]]) -> None:
    """Run callbacks on their loop; a list of texts is one delta callback's texts."""
    for fn, args in calls:
        if isinstance(args, list):
            fn("".join(args))
        else:
            fn(*args)


@dataclass
class _Exclusive:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


class ContinuousBatcher(_Batcher):
    """Runs requests with continuous batching on a single worker thread.

    The worker runs :meth:`StepEngine.step` while there is work: each step decodes one
    token for every running request and prefills at most one chunk of newcomers, so a
    request joins at the next step and leaves when it finishes. Requests not yet admitted
    wait in a bounded queue. Callbacks (text deltas, results) reach the event loop in
    order, in one wake-up per step at most, and text deltas at most every
    :data:`DELTA_INTERVAL_S` (a first token at once): a request's tokens of that span
    arrive as one piece of text.

    Args:
        generator: the generator whose model, adapters and tokenizer run the steps.
        max_batch_size: the most requests running at once (rows of the decode batch).
        max_wait_s: when nothing runs, how long the first request waits for others to
            share its prefill.
        max_queue: the most requests waiting for admission; one more raises
            :class:`Overloaded`.
        prefill_chunk_tokens: the prefill budget of one step, in prompt tokens (padding
            included): the longest a running request waits between two of its tokens.
        resolve: maps a request to the generator's adapter key when it is admitted, and
            raises for one that cannot run (an adapter not loaded); the generator's own
            adapter names when ``None``.
        on_first_token: called on the worker thread as ``on_first_token(request, seconds)``
            when a request's first token is chosen, ``seconds`` after it was queued.
    """

    def __init__(
        self,
        generator: Generator,
        max_batch_size: int = MAX_BATCH_SIZE,
        max_wait_s: float = MAX_WAIT_S,
        max_queue: int = 256,
        prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS,
        resolve: Callable[[GenerationRequest], str] | None = None,
        on_first_token: Callable[[GenerationRequest, float], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(
                f"max_batch_size and max_queue must be at least 1, got {max_batch_size}, "
                f"{max_queue}"
            )
        self.engine = StepEngine(generator, max_batch_size, prefill_chunk_tokens, resolve)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_first_token = on_first_token
        self.request_s = 1.0  # moving average of a request's time from queue to answer
        self._exclusive: deque[_Exclusive] = deque()
        self._after_step: list[Callable[[], None]] = []
        self._outbox: list[tuple[asyncio.AbstractEventLoop, Callable[..., Any], tuple]] = []
        self._urgent = False  # the outbox holds a first token: flush after this step
        self._flushed = 0.0  # time.monotonic() of the last flush
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def batch_sizes(self) -> Counter[int]:
        """Requests in a decode step -> decode steps run."""
        return self.engine.step_sizes

    @property
    def queue_depth(self) -> int:
        """Requests waiting to be admitted."""
        return self.engine.waiting

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained, from recent requests' durations."""
        return max(1, math.ceil(self.queue_depth / self.max_batch_size * self.request_s))

    def enqueue(
        self, request: GenerationRequest, on_delta: DeltaCallback | None = None
    ) -> asyncio.Future[GenerationResult]:
        """Queue one request now (call on the event loop); cancel the future to drop it.

        Raises:
            Overloaded: if the queue is full.
        """
        if self.engine.waiting >= self.max_queue:
            raise Overloaded(self.retry_after_s())
        loop = asyncio.get_running_loop()
        future: asyncio.Future[GenerationResult] = loop.create_future()
        queued = time.perf_counter()

        def done(outcome: GenerationResult | Exception) -> None:
            failed = isinstance(outcome, Exception)
            if not failed and outcome.finish_reason != "cancelled":
                took = time.perf_counter() - queued
                self.request_s += 0.1 * (took - self.request_s)
            self._outbox.append((loop, _settle, (future, outcome, failed)))

        def delta(text: str) -> None:
            self._outbox.append((loop, on_delta, (text,)))

        def first_token() -> None:
            self._urgent = True
            if self.on_first_token is not None:
                try:
                    self.on_first_token(request, time.perf_counter() - queued)
                except Exception:  # an observer's fault must not fail the step
                    log.exception("observing a time to first token failed")

        job = Job(request, done, delta if on_delta else None, first_token, future.done)
        self.engine.submit(job)
        self._start()
        return future

    async def run_exclusive(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the worker thread, between two steps."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._exclusive.append(_Exclusive(fn, args, loop, future))
        self._start()
        return await future

    def after_each_step(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` on the worker thread after every step (and between-step work)."""
        self._after_step.append(fn)

    def keys_in_use(self) -> set[str]:
        """Adapter keys of the requests admitted (call on the worker thread)."""
        return self.engine.keys_in_use()

    def abort(self, keys: set[str], error: Exception) -> None:
        """Fail the admitted requests of these adapter keys (call on the worker thread)."""
        self.engine.abort(keys, error)

    def close(self) -> None:
        """Stop the worker after its current step; requests not yet answered stay unanswered."""
        self._closed = True
        self._wake.set()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._work, name="lorafleet-generate", daemon=True
            )
            self._thread.start()
        self._wake.set()

    def _work(self) -> None:
        while not self._closed:
            self._wake.clear()  # before the checks below: a later set() is not lost
            ran = self._run_exclusive()
            if self.engine.busy:
                if not self.engine.running and not self.engine.prefilling:
                    self._wait_for_company()
                self._step()
            elif not ran:
                self._flush()
                self._wake.wait()

    def _wait_for_company(self) -> None:
        """Idle: let the first request wait up to ``max_wait_s`` for others to share its
        prefill (a full batch or work between steps ends the wait)."""
        deadline = time.monotonic() + self.max_wait_s
        while (left := deadline - time.monotonic()) > 0:
            self._wake.clear()
            if self.engine.waiting >= self.max_batch_size or self._exclusive or self._closed:
                return
            self._wake.wait(left)

    def _step(self) -> None:
        try:
            self.engine.step()
        except Exception as exc:  # a fault of the step itself: nobody's answer can be trusted
            log.exception("a batching step failed; its requests fail with it")
            self.engine.fail_all(exc)
        self._after_steps()

    def _run_exclusive(self) -> bool:
        ran = False
        while self._exclusive:
            work = self._exclusive.popleft()
            try:
                outcome, failed = work.fn(*work.args), False
            except Exception as exc:
                outcome, failed = exc, True
            self._outbox.append((work.loop, _settle, (work.future, outcome, failed)))
            ran = True
        if ran:
            self._after_steps()
        return ran

    def _after_steps(self) -> None:
        for fn in self._after_step:
            try:
                fn()
            except Exception:  # the worker must go on serving
                log.exception("work after a batching step failed")
        if self._urgent or time.monotonic() - self._flushed >= DELTA_INTERVAL_S:
            self._flush()

    def _flush(self) -> None:
        """Hand the callbacks so far to their event loops, one wake-up per loop; a
        request's text deltas are joined into one (its result comes after them)."""
        self._urgent, self._flushed = False, time.monotonic()
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, []
        calls: dict[asyncio.AbstractEventLoop, list] = {}
        texts: dict[int, list[str]] = {}  # id(on_delta) -> its texts, joined below
        for loop, fn, args in outbox:
            if fn is not _settle:
                if id(fn) in texts:
                    texts[id(fn)].append(args[0])
                    continue
                texts[id(fn)] = [args[0]]
                args = texts[id(fn)]  # joined once every delta is in
            calls.setdefault(loop, []).append((fn, args))
        for loop, batch in calls.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_call_all, batch)
