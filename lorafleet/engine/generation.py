"""Batched greedy generation over one base model and many LoRA adapters.

A :class:`Generator` holds a base model, its tokenizer and any number of named PEFT
adapters. :meth:`Generator.generate` runs a list of requests, each for its own adapter
(or for the base), as one left-padded batch in which every row goes through its own
adapter, so each row gets the tokens it would get alone. By default the adapters'
weights are stacked per module and every LoRA layer adds all rows' updates in one pass
(:mod:`lorafleet.engine.batched_lora`); PEFT's ``adapter_names`` path is the reference
and the fallback for adapters the stack cannot hold. Decoding is greedy, hence
deterministic. The evaluator and the serving runtime share this code.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import DynamicCache

from lorafleet.engine.batched_lora import BASE_ADAPTER, BatchedLora, LoraBank, LoraKernel
from lorafleet.engine.devices import pick_device, pick_dtype
from lorafleet.errors import LorafleetError

__all__ = [
    "BASE_ADAPTER",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "Generator",
    "LoraBackend",
    "prompt_token_ids",
]

log = logging.getLogger(__name__)

# "cancelled": the caller went away (a disconnected client) and the row stopped early.
FinishReason = Literal["stop", "length", "cancelled"]

# "batched": stacked adapters, one pass per LoRA layer; "peft": PEFT's adapter_names loop.
LoraBackend = Literal["batched", "peft"]


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: a chat, or a raw prompt, for one adapter or the base.

    Attributes:
        messages: OpenAI-style ``{"role", "content"}`` turns, rendered with the tokenizer's
            chat template and its generation prompt.
        prompt: raw text, used as is, instead of ``messages``.
        adapter: adapter name; ``None`` for the base model.
        max_new_tokens: the most tokens to generate.
        stop: strings that end the generation; the text is cut before the first one.
        ignore_eos: keep generating past the eos token until ``max_new_tokens`` (vLLM's
            extension of the OpenAI API; benchmarks use it to fix every answer's length).
    """

    messages: Sequence[Mapping[str, str]] = ()
    prompt: str | None = None
    adapter: str | None = None
    max_new_tokens: int = 64
    stop: Sequence[str] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if bool(self.messages) == bool(self.prompt):
            raise ValueError("a generation request needs either messages or a non-empty prompt")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class GenerationResult:
    """What one request produced.

    Attributes:
        text: the generated text, without the eos token and cut before any stop string.
        token_ids: the generated token ids, the eos token included when it ended the row.
        prompt_tokens: length of the prompt in tokens.
        finish_reason: ``"stop"`` (eos or a stop string), ``"length"`` (max_new_tokens) or
            ``"cancelled"`` (``is_cancelled`` said so; the text is what was made until then).
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: FinishReason

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def prompt_token_ids(tokenizer, request: GenerationRequest) -> list[int]:
    """A request's prompt as token ids: a raw prompt tokenised as it is, chat messages
    rendered by the chat template (which writes any bos token itself), then tokenised.
    Every engine (this one, vLLM's for evaluation) sends the model these same ids."""
    if request.prompt:
        return tokenizer(request.prompt)["input_ids"]
    text = tokenizer.apply_chat_template(
        [dict(m) for m in request.messages], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prompt_chars(request: GenerationRequest) -> int:
    """A cheap stand-in for a request's prompt length (what sorts a batch by length)."""
    return len(request.prompt or "") + sum(len(m["content"]) for m in request.messages)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of ``text`` may still change or vanish.

    A trailing replacement character is half of a multi-byte character, and a tail that
    starts a stop string is cut if the stop string completes; neither may be streamed yet.
    """
    settled = text.rstrip("\ufffd")
    partial = max(
        (k for s in stops for k in range(1, len(s)) if settled.endswith(s[:k])),
        default=0,
    )
    return len(text) - len(settled) + partial


@dataclass
class _Row:
    """Decoding state of one request in a batch."""

    request: GenerationRequest
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    streamed: int = 0
    finish_reason: FinishReason | None = None

    def push(self, token_id: int, tokenizer, eos_id: int) -> str:
        """Take the next token; return the text that is now final and was not returned before."""
        self.token_ids.append(token_id)
        text = tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.request.stop if s in text]
        if cuts:
            text, self.finish_reason = text[: min(cuts)], "stop"
        elif token_id == eos_id and not self.request.ignore_eos:
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.request.max_new_tokens:
            self.finish_reason = "length"
        self.text = text
        final = len(text) if self.finish_reason else len(text) - _held_back(text, self.request.stop)
        delta = text[self.streamed : final]
        self.streamed = max(self.streamed, final)
        return delta


class Generator:
    """A base model with named LoRA adapters that generates greedily in mixed-adapter batches.

    Thread-safe: :meth:`generate`, :meth:`next_token_logits`, :meth:`add_adapter` and
    :meth:`remove_adapter` hold one lock, so an adapter load or unload never lands in the
    middle of a batch (the serving runtime also runs them all on one worker thread).

    Args:
        base_dir: Hugging Face model directory (or hub id) whose tokenizer has a chat template.
        adapters: adapter name -> PEFT adapter directory, loaded now.
        device: torch device to run on; ``None``: the first CUDA device when one is
            visible, else the CPU (:func:`~lorafleet.engine.devices.pick_device`, which
            also refuses to run on the CPU in a step that was given GPUs).
        dtype: weight dtype, a ``torch.dtype`` or the spec's ``base.dtype`` name;
            ``"auto"``/``None``: bf16 on a GPU that supports it, else float32
            (:func:`~lorafleet.engine.devices.pick_dtype`). Attention runs through PyTorch
            SDPA on every device.
        revision: the hub revision of ``base_dir`` (the spec's ``base.revision``); ``None``
            for a local directory or the hub's default branch.
        lora_backend: how rows reach their adapters. ``"batched"``: the adapters' weights
            stacked per module, every LoRA layer adds all rows' updates in one pass
            (:class:`~lorafleet.engine.batched_lora.BatchedLora`); a batch that uses an
            adapter the stack cannot hold (DoRA, ...) runs through PEFT instead.
            ``"peft"``: PEFT's ``adapter_names`` path for every batch (the reference).
        lora_kernel: the batched kernel, ``"grouped"`` or ``"gather"``; ``None`` lets each
            layer pick by size on CPU and use "gather" elsewhere (see
            :mod:`lorafleet.engine.batched_lora`).
    """

    def __init__(
        self,
        base_dir: str | Path,
        adapters: Mapping[str, str | Path] | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        lora_backend: LoraBackend = "batched",
        lora_kernel: LoraKernel | None = None,
        revision: str | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base_dir = base_dir
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir, revision=revision)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._model = (
            AutoModelForCausalLM.from_pretrained(
                base_dir, revision=revision, dtype=self.dtype, attn_implementation="sdpa"
            )
            .to(self.device)
            .eval()
        )
        self._peft = None
        self._adapters: dict[str, Path] = {}
        self._batched = BatchedLora(lora_kernel) if lora_backend == "batched" else None
        self._lock = threading.Lock()
        # transformers 5 renamed forward's past_key_values to cache (the old name warns).
        forward = inspect.signature(self._model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward else "past_key_values"
        for name, path in (adapters or {}).items():
            self.add_adapter(name, path)

    @property
    def model(self):
        """The model that runs: a ``PeftModel`` while adapters are loaded, else the base model."""
        return self._model if self._peft is None else self._peft

    @property
    def adapters(self) -> dict[str, Path]:
        """Loaded adapters: name -> directory, in load order."""
        return dict(self._adapters)

    @property
    def lora_bank(self) -> LoraBank | None:
        """The stacked adapters of the batched backend; ``None`` with ``lora_backend="peft"``."""
        return None if self._batched is None else self._batched.bank

    @property
    def peft_fallbacks(self) -> dict[str, str]:
        """Adapters that run through PEFT under the batched backend: name -> why."""
        return {} if self._batched is None else dict(self._batched.fallbacks)

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Load a PEFT LoRA adapter under ``name``.

        Raises:
            LorafleetError: if the name is taken or reserved, or ``path`` is no adapter directory.
        """
        path = Path(path)
        with self._lock:
            if name == BASE_ADAPTER or name in self._adapters:
                raise LorafleetError(f"adapter name {name!r} is reserved or already loaded")
            if not (path / "adapter_config.json").is_file():
                raise LorafleetError(
                    f"{path}: not a PEFT adapter directory (no adapter_config.json)"
                )
            if self._peft is None:
                from peft import PeftModel

                self._peft = PeftModel.from_pretrained(self._model, path, adapter_name=name).eval()
            else:
                self._peft.load_adapter(path, adapter_name=name)
            self._adapters[name] = path
            self._sync_batched()
            if name in self.peft_fallbacks:
                log.warning(
                    "adapter %r runs through PEFT's per-adapter path, not the batched one: %s",
                    name,
                    self.peft_fallbacks[name],
                )

    def remove_adapter(self, name: str) -> None:
        """Unload the adapter ``name``; the base and the other adapters stay.

        Raises:
            LorafleetError: if no adapter of that name is loaded.
        """
        with self._lock:
            self._adapter_key(name)
            del self._adapters[name]
            if self._adapters:
                self._peft.delete_adapter(name)
            else:
                # PEFT cannot run with zero adapters; unload() strips the LoRA layers in place.
                self._peft.unload()
                self._peft = None
            self._sync_batched()

    def _sync_batched(self) -> None:
        if self._batched is not None:
            self._batched.sync(self._peft, list(self._adapters))

    def _adapter_key(self, name: str | None) -> str:
        if name is None:
            return BASE_ADAPTER
        if name not in self._adapters:
            raise LorafleetError(
                f"unknown adapter {name!r}; loaded: {', '.join(self._adapters) or 'none'}"
            )
        return name

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        return prompt_token_ids(self.tokenizer, request)

    @contextlib.contextmanager
    def _routing(self, keys: Sequence[str]) -> Iterator[dict[str, Any]]:
        """Send row ``i`` of the forward passes in the block through adapter ``keys[i]``;
        yields the extra keyword arguments of those passes."""
        adapters = [None if k == BASE_ADAPTER else k for k in keys]
        if self._peft is None:
            yield {}
        elif self._batched is not None and self._batched.covers(adapters):
            with self._batched.route(adapters):
                yield {}
        else:
            yield {"adapter_names": list(keys)}

    @contextlib.contextmanager
    def adapter_model(self, adapter: str | None) -> Iterator[Any]:
        """The model with one adapter active for whole-sequence forward passes (held-out
        loss); adapters disabled for ``None`` (the base). PEFT's own switch, not the batched
        routing of :meth:`generate`; the lock is held for the block.

        Raises:
            LorafleetError: if ``adapter`` is not loaded.
        """
        with self._lock:
            self._adapter_key(adapter)
            model = self.model
            if adapter is None and self._peft is not None:
                with model.disable_adapter():
                    yield model
            else:
                if adapter is not None:
                    model.set_adapter(adapter)
                yield model

    @torch.inference_mode()
    def next_token_logits(self, request: GenerationRequest) -> torch.Tensor:
        """The logits of the first generated token for one request (no decoding).

        Returns:
            A float32 tensor of shape (V,) on the CPU.
        """
        with self._lock:
            adapter = self._adapter_key(request.adapter)
            input_ids = torch.tensor([self._prompt_ids(request)], device=self.device)  # (1, T)
            with self._routing([adapter]) as routing:
                logits = self.model(input_ids=input_ids, **routing).logits  # (1, T, V)
            return logits[0, -1].float().cpu()

    @torch.inference_mode()
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        on_delta: Callable[[int, str], None] | None = None,
        is_cancelled: Callable[[int], bool] | None = None,
    ) -> list[GenerationResult]:
        """Generate greedily for all requests in one mixed-adapter batch.

        Args:
            requests: the requests; each names its adapter (or ``None`` for the base).
            on_delta: called as ``on_delta(i, text)`` whenever request ``i`` has new final
                text; the texts of one request add up to its result's ``text``.
            is_cancelled: polled as ``is_cancelled(i)`` after each forward pass; a row it is
                true for stops with ``finish_reason="cancelled"``, and the batch stops early
                once every row has finished.

        Returns:
            One result per request, in order.

        Raises:
            LorafleetError: if a request names an adapter that is not loaded.
        """
        if not requests:
            return []
        with self._lock:
            keys = [self._adapter_key(r.adapter) for r in requests]
            with self._routing(keys) as routing:
                return self._decode(requests, routing, on_delta, is_cancelled)

    def generate_all(
        self,
        requests: Sequence[GenerationRequest],
        batch_size: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[GenerationResult]:
        """Generate for any number of requests, in batches of one adapter and similar length.

        Left padding makes every row of a batch as long as its longest prompt; batching
        requests sorted by prompt length wastes little of the prefill on padding, and a
        batch of one adapter needs no per-row LoRA routing. Greedy
        results do not depend on a batch's other rows, so the answers are those of
        :meth:`generate` on each request.

        Args:
            requests: the requests.
            batch_size: the most requests per batch.
            on_batch: called with the size of each finished batch (progress bars).

        Returns:
            One result per request, in the order of ``requests``.
        """
        # By adapter first: a batch of one adapter takes the plain-matmul LoRA path.
        order = sorted(
            range(len(requests)),
            key=lambda i: (requests[i].adapter or "", _prompt_chars(requests[i])),
        )
        results: list[GenerationResult | None] = [None] * len(requests)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, result in zip(chunk, self.generate([requests[i] for i in chunk]), strict=True):
                results[i] = result
            if on_batch is not None:
                on_batch(len(chunk))
        return results

    def _decode(
        self,
        requests: Sequence[GenerationRequest],
        routing: Mapping[str, Any],
        on_delta: Callable[[int, str], None] | None,
        is_cancelled: Callable[[int], bool] | None,
    ) -> list[GenerationResult]:
        """The decoding loop of :meth:`generate`; ``routing`` goes to every forward pass."""
        prompts = [self._prompt_ids(r) for r in requests]
        # Left padding puts every row's next token in the last column. Shape (B, T).
        width = max(map(len, prompts))
        input_ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention_mask[i, width - len(p) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        # Positions count real tokens only, so a padded row sees what it would see alone.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        model = self.model
        rows = [_Row(r) for r in requests]
        eos_id = self.tokenizer.eos_token_id
        # One cache object for the whole loop: each forward pass appends its keys and values
        # to it in place (a legacy tuple cache is deprecated).
        cache = {self._cache_kwarg: DynamicCache(config=self._model.config)}
        for _ in range(max(r.max_new_tokens for r in requests)):
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **cache,
                **routing,
            )
            next_ids = out.logits[:, -1, :].argmax(dim=-1)  # (B,)
            for i, row in enumerate(rows):
                if row.finish_reason is None and is_cancelled is not None and is_cancelled(i):
                    row.finish_reason = "cancelled"
                if row.finish_reason is None:
                    delta = row.push(int(next_ids[i]), self.tokenizer, eos_id)
                    if delta and on_delta is not None:
                        on_delta(i, delta)
            if all(row.finish_reason for row in rows):
                break
            # Finished rows keep decoding alongside the others; their tokens are ignored.
            input_ids = next_ids[:, None]
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1
            )
            position_ids = position_ids[:, -1:] + 1
        return [
            GenerationResult(
                text=row.text,
                token_ids=row.token_ids,
                prompt_tokens=len(p),
                finish_reason=row.finish_reason,
            )
            for row, p in zip(rows, prompts, strict=True)
        ]
