"""Continuous batching: a request joins the running batch at its next decode step and leaves
it when it finishes.

A :class:`StepEngine` runs the requests of a
:class:`~lorafleet.engine.generation.Generator` one iteration at a time
(:meth:`StepEngine.step`). An iteration is one decode step for every running row, each
through its own adapter, plus at most one prefill chunk of the newcomers being admitted:

* **Admission.** Waiting requests form a *group* in arrival order: as many as fit into
  the prefill budget (``prefill_chunk_tokens``, left padding included) and the free rows
  (``max_rows``), at least one. A request whose adapter is gone or whose prompt cannot be
  built fails alone here (and one whose caller left, before it costs anything).
* **Chunked prefill.** The group's left-padded prompts run a chunk of columns per
  iteration, at most ``prefill_chunk_tokens`` tokens in all, so a running row waits for at
  most one chunk between two of its decode steps. A prompt longer than the budget takes
  several iterations. While no row decodes nobody waits, so a group formed then may be
  :data:`IDLE_PREFILL_FACTOR` times larger, with chunks to match (a burst on an idle
  runtime starts in few passes).
* **Merge.** When a group's prompts are done, each row takes its first token (the time to
  first token) and the group's cache joins the running cache: right-aligned with it,
  rows appended. Rows' positions are their own, so the columns they share need not line up.
* **Leave.** A finished, cancelled or failed row leaves the running cache at once: the last
  row moves into its slot, and leading columns that no remaining row attends to are dropped.

The running rows share one KV cache (:class:`_Batch`) held in buffers with spare rows and
columns, so a decode step writes one column in place instead of copying the cache, as
``DynamicCache`` does. A forward pass that raises fails only the rows that raise alone: the
rows are split in halves and run again, down to single rows, and nothing is written to the
cache until a pass succeeds. Decoding is greedy: every request gets the tokens
:meth:`Generator.generate` gives it alone.

The engine is not thread-safe: one thread calls :meth:`StepEngine.step` (the serving
runtime's worker, :class:`~lorafleet.serve.batching.ContinuousBatcher`); only
:meth:`StepEngine.submit` may be called from another thread. It supports models whose
layers all attend to the whole context (Llama, Qwen2, ...): a sliding-window layer would
see more than its window.
"""

from __future__ import annotations

import inspect
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from lorafleet.engine.generation import (
    GenerationRequest,
    GenerationResult,
    Generator,
    _Row,
)
from lorafleet.errors import LorafleetError

__all__ = ["DEFAULT_PREFILL_CHUNK_TOKENS", "IDLE_PREFILL_FACTOR", "Job", "StepEngine"]

# The prefill budget of one iteration (tokens, padding included): the most a running row
# waits between two of its decode steps is one forward pass over this many prompt tokens.
DEFAULT_PREFILL_CHUNK_TOKENS = 256

# With no row decoding, nobody waits for a prefill: a group may then take this many times
# the budget per forward pass (a burst on an idle runtime is prefilled in few passes; 8 x
# 256 is vLLM's CPU default step of 2048 tokens).
IDLE_PREFILL_FACTOR = 8

# Spare columns a growing cache reserves at least (a relayout copies the whole cache).
_MIN_SPARE_COLUMNS = 32


def _never() -> bool:
    return False


@dataclass(eq=False)
class Job:
    """One request on its way through a :class:`StepEngine`, and whom it reports to.

    The callbacks run on the thread that calls :meth:`StepEngine.step`.

    Attributes:
        request: what to generate; ``request.adapter`` is what ``resolve`` maps to a key.
        on_done: called once with the result, or with the exception that failed the request.
        on_delta: called with each piece of new final text (see ``Generator.generate``).
        on_first_token: called when the first token is chosen (time to first token).
        is_cancelled: polled every iteration; once true, the request stops with
            ``finish_reason="cancelled"`` and leaves the batch.
        key: the generator's adapter key, set at admission.
        prompt: the prompt's token ids, set at admission.
    """

    request: GenerationRequest
    on_done: Callable[[GenerationResult | Exception], None]
    on_delta: Callable[[str], None] | None = None
    on_first_token: Callable[[], None] | None = None
    is_cancelled: Callable[[], bool] = _never
    key: str = ""
    prompt: list[int] = field(default_factory=list)
    row: _Row | None = None

    def result(self) -> GenerationResult:
        row = self.row or _Row(self.request, finish_reason="cancelled")
        return GenerationResult(row.text, row.token_ids, len(self.prompt), row.finish_reason)


class _Layer(CacheLayerMixin):
    """One model layer's keys and values in a :class:`_Batch`'s buffers.

    A forward pass writes its new columns at the batch's ``end`` and attends to
    ``[start, end + new)``; the batch commits them (moves ``end``) only once the pass
    succeeded, so a pass that raises leaves nothing behind.
    """

    is_sliding = False
    is_compileable = False

    def __init__(self, batch: _Batch) -> None:
        super().__init__()
        self.batch = batch
        self.k: torch.Tensor | None = None  # (rows_cap, heads, cols_cap, head_dim)
        self.v: torch.Tensor | None = None

    def allocate(self, like: torch.Tensor) -> None:
        """Zeroed buffers at the batch's capacity: zeros, never NaN, in columns nobody
        attends to (a masked column has weight 0, and 0 * NaN is NaN)."""
        b = self.batch
        shape = (b.rows_cap, like.shape[1], b.cols_cap, like.shape[3])
        self.k = like.new_zeros(shape)
        self.v = like.new_zeros(shape)
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.allocate(key_states)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            self.allocate(key_states)
        b, rows, n = self.batch, key_states.shape[0], key_states.shape[-2]
        self.k[:rows, :, b.end : b.end + n] = key_states
        self.v[:rows, :, b.end : b.end + n] = value_states
        return self.k[:rows, :, b.start : b.end + n], self.v[:rows, :, b.start : b.end + n]

    def get_seq_length(self) -> int:
        return self.batch.end - self.batch.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class _Batch:
    """Rows that share one KV cache, in buffers with spare rows and columns.

    Row ``i`` is ``jobs[i]``; its cache lives in slot ``i`` of every buffer, its attention
    mask in ``mask[i]``. The live columns are ``[start, end)``; a row attends to the live
    columns its mask marks. ``pos[i]`` is the position of row ``i``'s next token and
    ``last[i]`` that token (the input of its next decode step).

    Args:
        layers: the model's number of layers.
        device: where the buffers live.
        row_limit: the most rows the batch will hold (how far spare rows may grow).
    """

    def __init__(self, layers: int, device: torch.device, row_limit: int) -> None:
        self.layers = [_Layer(self) for _ in range(layers)]
        self.cache = Cache(layers=self.layers)
        self.device = device
        self.row_limit = row_limit
        self._reset()

    def _reset(self) -> None:
        """Empty, with no buffers."""
        for layer in self.layers:
            layer.k = layer.v = None
            layer.is_initialized = False
        self.jobs: list[Job] = []
        self.start = self.end = 0
        self.rows_cap = self.cols_cap = 0
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(0, dtype=torch.long, device=self.device)
        self.last = torch.zeros(0, dtype=torch.long, device=self.device)

    @property
    def rows(self) -> int:
        return len(self.jobs)

    @property
    def width(self) -> int:
        """Live columns."""
        return self.end - self.start

    def reserve(self, rows: int, after: int, before: int = 0, spare: bool = True) -> None:
        """Make room for ``rows`` rows, ``after`` new columns after ``end`` and ``before``
        columns before it (a group merged right-aligned); moves the live columns if needed.

        Args:
            spare: reserve room to grow too, so that a growing batch moves its cache
                rarely (a running batch); ``False``: exactly what is asked (a group).
        """
        if rows <= self.rows_cap and self.end + after <= self.cols_cap and self.end >= before:
            return
        live = self.width
        offset = max(before - live, 0)  # where the live columns start in the new buffers
        cols = offset + live + after
        if spare:
            cols += max(_MIN_SPARE_COLUMNS, live)
            rows = max(rows, min(self.row_limit, 2 * rows))
        self._relayout(rows, cols, offset)

    def _relayout(self, rows_cap: int, cols_cap: int, offset: int) -> None:
        """New buffers of ``rows_cap`` x ``cols_cap``, live columns copied to ``offset``."""
        n, live, old = self.rows, slice(self.start, self.end), slice(offset, offset + self.width)
        for layer in self.layers:
            if layer.k is None:
                continue
            k, v = layer.k, layer.v
            layer.k = k.new_zeros((rows_cap, k.shape[1], cols_cap, k.shape[3]))
            layer.v = v.new_zeros(layer.k.shape)
            layer.k[:n, :, old] = k[:n, :, live]
            layer.v[:n, :, old] = v[:n, :, live]
        mask = self.mask.new_zeros((rows_cap, cols_cap))
        mask[:n, old] = self.mask[:n, live]
        pos, last = self.pos.new_zeros(rows_cap), self.last.new_zeros(rows_cap)
        pos[:n], last[:n] = self.pos[:n], self.last[:n]
        self.mask, self.pos, self.last = mask, pos, last
        self.rows_cap, self.cols_cap = rows_cap, cols_cap
        self.start, self.end = offset, offset + self.width

    def commit(self, n: int) -> None:
        """The ``n`` columns written after ``end`` by a successful forward pass are live."""
        self.end += n

    def remove(self, rows: Iterable[int]) -> None:
        """Drop rows: the last rows move into the freed slots; then :meth:`trim`."""
        gone = set(rows)
        if not gone:
            return
        keep = self.rows - len(gone)
        holes = [r for r in sorted(gone) if r < keep]
        movers = [r for r in range(keep, self.rows) if r not in gone]
        if holes:
            dst = torch.tensor(holes, device=self.device)
            src = torch.tensor(movers, device=self.device)
            live = slice(self.start, self.end)
            for layer in self.layers:
                if layer.k is not None:
                    layer.k[dst, :, live] = layer.k[src, :, live]
                    layer.v[dst, :, live] = layer.v[src, :, live]
            # Whole mask rows: a slot's mask is zero outside its row's columns.
            self.mask[dst] = self.mask[src]
            self.pos[dst], self.last[dst] = self.pos[src], self.last[src]
            for hole, mover in zip(holes, movers, strict=True):
                self.jobs[hole] = self.jobs[mover]
        del self.jobs[keep:]
        self.trim()

    def trim(self) -> None:
        """Drop leading live columns that no row attends to; free the buffers once empty."""
        if not self.jobs:
            self._reset()
            return
        used = self.mask[: self.rows, self.start : self.end].any(dim=0)
        first = int(used.to(torch.uint8).argmax())  # the first column a row attends to
        self.start += first if bool(used[first]) else 0

    def gather(self, rows: Sequence[int], after: int) -> _Batch:
        """A new batch of copies of ``rows`` (their live columns at 0), with room for
        ``after`` columns whose mask is already set here (a forward pass on some rows)."""
        sub = _Batch(len(self.layers), self.device, len(rows))
        idx = torch.tensor(list(rows), device=self.device)
        sub.rows_cap, sub.cols_cap = len(rows), self.width + after
        sub.end = self.width
        for mine, theirs in zip(self.layers, sub.layers, strict=True):
            if mine.k is not None:
                theirs.k = mine.k.index_select(0, idx)[:, :, self.start : self.end + after]
                theirs.v = mine.v.index_select(0, idx)[:, :, self.start : self.end + after]
                theirs.is_initialized = True
        sub.mask = self.mask.index_select(0, idx)[:, self.start : self.end + after]
        sub.pos, sub.last = self.pos.index_select(0, idx), self.last.index_select(0, idx)
        sub.jobs = [self.jobs[r] for r in rows]
        return sub

    def put_columns(self, rows: Sequence[int], sub: _Batch, n: int) -> None:
        """Copy the ``n`` columns a forward pass wrote after ``sub.end`` (``sub`` from
        :meth:`gather` of ``rows``) to this batch's ``end``."""
        if self.layers[0].k is None:
            for mine, theirs in zip(self.layers, sub.layers, strict=True):
                mine.allocate(theirs.k)
        idx = torch.tensor(list(rows), device=self.device)
        for mine, theirs in zip(self.layers, sub.layers, strict=True):
            mine.k[idx, :, self.end : self.end + n] = theirs.k[:, :, sub.end : sub.end + n]
            mine.v[idx, :, self.end : self.end + n] = theirs.v[:, :, sub.end : sub.end + n]

    def absorb(self, group: _Batch) -> None:
        """Append ``group``'s rows, their live columns right-aligned with this batch's."""
        n, g, width = self.rows, group.rows, group.width
        self.reserve(n + g, after=1, before=width)
        if self.layers[0].k is None:
            for mine, theirs in zip(self.layers, group.layers, strict=True):
                mine.allocate(theirs.k)
        new, cols = slice(n, n + g), slice(self.end - width, self.end)
        live = slice(group.start, group.end)
        for mine, theirs in zip(self.layers, group.layers, strict=True):
            mine.k[new, :, cols] = theirs.k[:g, :, live]
            mine.v[new, :, cols] = theirs.v[:g, :, live]
        self.mask[new] = 0
        self.mask[new, cols] = group.mask[:g, live]
        self.pos[new], self.last[new] = group.pos[:g], group.last[:g]
        self.start = min(self.start, self.end - width) if n else self.end - width
        self.jobs.extend(group.jobs)


@dataclass(eq=False)
class _Group:
    """Newcomers whose prompts are being prefilled, in chunks of columns.

    Attributes:
        batch: their cache.
        ids: (G, W) the left-padded prompts.
        mask: (G, W) 1 on prompt tokens, 0 on padding.
        pos: (G, W) each token's position (padding: 0).
        budget: the most tokens per forward pass (padding included).
        done: prompt columns already run.
    """

    batch: _Batch
    ids: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    budget: int
    done: int = 0

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    def select(self, rows: Sequence[int]) -> None:
        """Keep only ``rows``, in that order (rows that failed or whose caller left go)."""
        idx = torch.tensor(list(rows), device=self.ids.device)
        batch = self.batch
        self.batch = batch.gather(rows, batch.cols_cap - batch.end)
        self.ids, self.mask, self.pos = self.ids[idx], self.mask[idx], self.pos[idx]


class StepEngine:
    """Runs generation requests with continuous batching, one iteration per :meth:`step`.

    Args:
        generator: the base, adapters and tokenizer; its lock is held during each step.
        max_rows: the most rows running (and being admitted) at once.
        prefill_chunk_tokens: the prefill budget of one iteration, in tokens (padding
            included): the longest a running row waits between two of its decode steps.
        resolve: maps a request to the generator's adapter key at admission (raising if it
            has none); the generator's own names when ``None``.

    Attributes:
        step_sizes: rows in a decode step -> decode steps run (how full steps were).
    """

    def __init__(
        self,
        generator: Generator,
        max_rows: int = 64,
        prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS,
        resolve: Callable[[GenerationRequest], str] | None = None,
    ) -> None:
        if max_rows < 1 or prefill_chunk_tokens < 1:
            raise ValueError(
                f"max_rows and prefill_chunk_tokens must be at least 1, got {max_rows}, "
                f"{prefill_chunk_tokens}"
            )
        self.generator = generator
        self.max_rows = max_rows
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.resolve = resolve or (lambda request: generator._adapter_key(request.adapter))
        self.step_sizes: Counter[int] = Counter()
        self._tokenizer = generator.tokenizer
        self._eos_id = generator.tokenizer.eos_token_id
        self._pad_id = generator.tokenizer.pad_token_id
        self._layers = generator._model.config.num_hidden_layers
        self._device = generator.device
        self._waiting: deque[Job] = deque()
        self._waiting_lock = threading.Lock()  # submit() appends from another thread
        self._running = _Batch(self._layers, self._device, max_rows)
        self._group: _Group | None = None
        forward = inspect.signature(generator._model.forward).parameters
        # Only the last column's logits are used: the (tokens x vocabulary) rest is skipped.
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}

    @property
    def waiting(self) -> int:
        """Requests not yet admitted."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Rows decoding."""
        return self._running.rows

    @property
    def prefilling(self) -> int:
        """Rows whose prompts are being prefilled (they decode once it is done)."""
        return self._group.batch.rows if self._group else 0

    @property
    def cache_columns(self) -> int:
        """Columns of the running rows' KV cache (the longest row, padding included)."""
        return self._running.width

    @property
    def busy(self) -> bool:
        """Whether a step has anything to do."""
        return bool(self._waiting or self._group or self._running.rows)

    def submit(self, job: Job) -> None:
        """Queue a request (from any thread); it is admitted at a later step."""
        with self._waiting_lock:
            self._waiting.append(job)

    def keys_in_use(self) -> set[str]:
        """The adapter keys of the rows running or being prefilled."""
        jobs = self._running.jobs + (self._group.batch.jobs if self._group else [])
        return {job.key for job in jobs}

    @torch.inference_mode()
    def abort(self, keys: set[str], error: Exception) -> None:
        """Fail the admitted rows whose adapter key is in ``keys`` (an unloaded adapter)."""
        running = self._running
        rows = [i for i, job in enumerate(running.jobs) if job.key in keys]
        self._fail(running.jobs, rows, error)
        running.remove(rows)
        if self._group is not None:
            jobs = self._group.batch.jobs
            self._drop_from_group([i for i, j in enumerate(jobs) if j.key in keys], error)

    @torch.inference_mode()
    def fail_all(self, error: Exception) -> None:
        """Fail every request, waiting or admitted, and start afresh (a step that broke)."""
        jobs = [*self._running.jobs, *(self._group.batch.jobs if self._group else [])]
        while self._waiting:
            jobs.append(self._waiting.popleft())
        self._running = _Batch(self._layers, self._device, self.max_rows)
        self._group = None
        for job in jobs:
            job.on_done(error)

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: drop rows whose caller left, admit newcomers, run one decode step
        for every running row and one prefill chunk of the group being admitted."""
        with self.generator._lock:
            self._drop_cancelled()
            if self._group is None:
                self._admit()
            if self._running.rows:
                self._decode()
            if self._group is not None:
                self._prefill()

    def forward(self, jobs: Sequence[Job], **inputs) -> torch.Tensor:
        """One forward pass for ``jobs``' rows, each through its adapter; every pass of the
        engine goes through here.

        Args:
            jobs: the rows, in batch order.
            **inputs: the model's inputs (ids, mask, positions, cache).

        Returns:
            (rows, vocabulary) logits of the last column.
        """
        generator = self.generator
        with generator._routing([job.key for job in jobs]) as routing:
            out = generator.model(use_cache=True, **inputs, **self._keep, **routing)
        return out.logits[:, -1]

    def _run(
        self, batch: _Batch, rows: list[int], ids: torch.Tensor, pos: torch.Tensor, n: int
    ) -> torch.Tensor:
        """Run ``n`` new columns of ``rows`` (their mask already set); returns their logits.

        All rows run on the batch's own cache; a subset (after a failure) runs on copies,
        and its new columns are copied back.
        """
        cache = {self.generator._cache_kwarg: None}
        if len(rows) == batch.rows:
            cache[self.generator._cache_kwarg] = batch.cache
            mask = batch.mask[: batch.rows, batch.start : batch.end + n]
            return self.forward(
                batch.jobs, input_ids=ids, attention_mask=mask, position_ids=pos, **cache
            )
        sub = batch.gather(rows, n)
        idx = torch.tensor(rows, device=self._device)
        cache[self.generator._cache_kwarg] = sub.cache
        logits = self.forward(
            sub.jobs,
            input_ids=ids.index_select(0, idx),
            attention_mask=sub.mask,
            position_ids=pos.index_select(0, idx),
            **cache,
        )
        batch.put_columns(rows, sub, n)
        return logits

    def _isolated(
        self, rows: list[int], run: Callable[[list[int]], torch.Tensor]
    ) -> list[tuple[list[int], torch.Tensor | Exception]]:
        """``run(rows)``, split in halves while it raises, down to single rows: an exception
        reaches only the rows that raise it alone. Returns (rows, logits or exception) pieces."""
        try:
            return [(rows, run(rows))]
        except Exception as exc:
            if len(rows) == 1:
                return [(rows, exc)]
            half = len(rows) // 2
            return self._isolated(rows[:half], run) + self._isolated(rows[half:], run)

    def _drop_cancelled(self) -> None:
        with self._waiting_lock:  # callers that left free their place in the queue
            left = {job for job in self._waiting if job.is_cancelled()}
            if left:
                self._waiting = deque(job for job in self._waiting if job not in left)
        for job in left:
            self._finish(job, "cancelled")
        running = self._running
        gone = [i for i, job in enumerate(running.jobs) if job.is_cancelled()]
        for i in gone:
            self._finish(running.jobs[i], "cancelled")
        running.remove(gone)
        if self._group is not None:
            jobs = self._group.batch.jobs
            gone = [i for i, job in enumerate(jobs) if job.is_cancelled()]
            for i in gone:
                self._finish(jobs[i], "cancelled")
            self._drop_from_group(gone, None)

    def _finish(self, job: Job, reason: str | None = None) -> None:
        if reason is not None:
            job.row = job.row or _Row(job.request)
            job.row.finish_reason = job.row.finish_reason or reason
        job.on_done(job.result())

    def _drop_from_group(self, rows: list[int], error: Exception | None) -> None:
        """Take ``rows`` out of the group (failing them with ``error`` unless ``None``)."""
        group = self._group
        if not rows or group is None:
            return
        if error is not None:
            self._fail(group.batch.jobs, rows, error)
        keep = [i for i in range(group.batch.rows) if i not in set(rows)]
        if keep:
            group.select(keep)
        else:
            self._group = None

    def _prepare(self, job: Job) -> None:
        """Resolve the adapter and build the prompt (raising what makes the request fail)."""
        job.key = self.resolve(job.request)
        if not job.prompt:
            job.prompt = self.generator._prompt_ids(job.request)
            if not job.prompt:
                raise LorafleetError("the prompt is empty once tokenized")

    def _admit(self) -> None:
        """Form the next group from the waiting requests, in arrival order."""
        free = self.max_rows - self._running.rows
        budget = self.prefill_chunk_tokens * (1 if self._running.rows else IDLE_PREFILL_FACTOR)
        chosen: list[Job] = []
        width = 0
        while self._waiting and len(chosen) < free:
            job = self._waiting[0]
            if job.is_cancelled():
                self._waiting.popleft()
                self._finish(job, "cancelled")
                continue
            try:
                self._prepare(job)
            except Exception as exc:  # this request's own fault: it fails alone
                self._waiting.popleft()
                job.on_done(exc)
                continue
            wider = max(width, len(job.prompt))
            if chosen and (len(chosen) + 1) * wider > budget:
                break
            chosen.append(self._waiting.popleft())
            width = wider
        if not chosen:
            return
        ids = torch.full((len(chosen), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, job in enumerate(chosen):
            ids[i, width - len(job.prompt) :] = torch.tensor(job.prompt)
            mask[i, width - len(job.prompt) :] = 1
            job.row = _Row(job.request)
        ids, mask = ids.to(self._device), mask.to(self._device)
        # Positions count real tokens only, as in Generator.generate.
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        batch = _Batch(self._layers, self._device, len(chosen))
        batch.reserve(len(chosen), after=width, spare=False)
        batch.jobs = chosen
        self._group = _Group(batch, ids, mask, pos, budget)

    def _decode(self) -> None:
        """One decode step for every running row."""
        batch = self._running
        n = batch.rows
        self.step_sizes[n] += 1
        batch.reserve(n, after=1)
        batch.mask[:n, batch.end] = 1
        ids, pos = batch.last[:n, None], batch.pos[:n, None]
        pieces = self._isolated(list(range(n)), lambda rows: self._run(batch, rows, ids, pos, 1))
        batch.commit(1)
        batch.pos[:n] += 1
        failed: list[int] = []
        for rows, out in pieces:
            if isinstance(out, Exception):
                self._fail(batch.jobs, rows, out)
                failed += rows
                continue
            self._take(batch, rows, out.argmax(dim=-1), first=False)
        done = [i for i, job in enumerate(batch.jobs) if job.row.finish_reason]
        for i in done:
            if i not in failed:
                self._finish(batch.jobs[i])
        batch.remove([*failed, *done])

    def _prefill(self) -> None:
        """One chunk of the group's prompts; a group done joins the running batch."""
        group = self._group
        batch, g = group.batch, group.batch.rows
        n = min(max(1, group.budget // g), group.width - group.done)
        cols = slice(group.done, group.done + n)
        batch.mask[:g, batch.end : batch.end + n] = group.mask[:, cols]
        ids, pos = group.ids[:, cols], group.pos[:, cols]
        pieces = self._isolated(list(range(g)), lambda rows: self._run(batch, rows, ids, pos, n))
        batch.commit(n)
        group.done += n
        last = group.done == group.width
        failed: list[int] = []
        for rows, out in pieces:
            if isinstance(out, Exception):
                self._fail(batch.jobs, rows, out)
                failed += rows
            elif last:
                self._take(batch, rows, out.argmax(dim=-1), first=True)
        if last:
            batch.pos[:g] = group.mask.sum(dim=-1)
            done = [
                i for i, job in enumerate(batch.jobs) if i not in failed and job.row.finish_reason
            ]
            for i in done:
                self._finish(batch.jobs[i])
            batch.remove([*failed, *done])
            self._group = None
            if batch.rows:
                self._running.absorb(batch)
        else:
            self._drop_from_group(failed, None)

    def _fail(self, jobs: list[Job], rows: list[int], error: Exception) -> None:
        for i in rows:
            jobs[i].on_done(error)

    def _take(self, batch: _Batch, rows: list[int], tokens: torch.Tensor, first: bool) -> None:
        """Rows' next tokens: the input of their next step, their text, their deltas."""
        if len(rows) == batch.rows:
            batch.last[: batch.rows] = tokens
        else:
            batch.last[torch.tensor(rows, device=self._device)] = tokens
        tokenizer, eos_id = self._tokenizer, self._eos_id
        for i, token in zip(rows, tokens.tolist(), strict=True):
            job = batch.jobs[i]
            if first and job.on_first_token is not None:
                job.on_first_token()
            delta = job.row.push(token, tokenizer, eos_id)
            if delta and job.on_delta is not None:
                job.on_delta(delta)
