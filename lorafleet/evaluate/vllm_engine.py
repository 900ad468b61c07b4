"""Evaluation through vLLM, for a base that one device cannot hold.

:class:`VllmEvalEngine` starts vLLM's OpenAI server as a child process with the base split
over ``tensor_parallel_size`` GPUs and the arms' adapters loaded (``--lora-modules``), and
offers what the evaluators use of a :class:`~lorafleet.engine.generation.Generator`:
``tokenizer``, :meth:`~VllmEvalEngine.generate_all` and a held-out loss
(:meth:`~VllmEvalEngine.heldout_loss`). vLLM listens on a Unix socket in a private
temporary directory only.

The numbers are those of the transformers path, up to kernels and summation order:

- prompts are the Generator's own token ids (the chat template rendered, then tokenised
  without special tokens) sent as ``prompt`` token ids, never as text vLLM would template;
- decoding is greedy (temperature 0) with the model's ``generation_config.json`` ignored
  (``--generation-config vllm``), as the Generator ignores it; stop strings and
  ``finish_reason`` (``"stop"``/``"length"``) mean the same;
- the loss sums ``-logprob`` of each conversation's own next tokens (vLLM's
  ``prompt_logprobs``) over exactly the tokens :func:`~lorafleet.evaluate.loss.encode_records`
  labels, and reports through :func:`~lorafleet.evaluate.loss.loss_summary`.

The process itself is started by the serving layer's launcher (``launch``, in the pipeline
:class:`lorafleet.serve.vllm_front.VllmProcess`): evaluation does not import serving.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import httpx

from lorafleet.chat import IGNORE_INDEX
from lorafleet.engine.generation import GenerationRequest, GenerationResult, prompt_token_ids
from lorafleet.errors import LorafleetError
from lorafleet.evaluate.loss import encode_records, loss_summary
from lorafleet.fleet.evaluation import pick_engine
from lorafleet.llm import openai_error_line
from lorafleet.records import Record

__all__ = ["BASE_NAME", "ServerProcess", "VllmEvalEngine", "pick_engine", "vllm_eval_args"]

# The base's served name; the adapters are served under their arm's adapter names.
BASE_NAME = "base"
# vLLM's OpenAI server, as vLLM's images (and lorafleet's front) run it.
VLLM_ENTRY_POINT = "vllm.entrypoints.openai.api_server"


class ServerProcess(Protocol):
    """A vLLM child process (what :class:`lorafleet.serve.vllm_front.VllmProcess` is)."""

    def start(self) -> None: ...

    def alive(self) -> bool: ...

    @property
    def returncode(self) -> int | None: ...

    def stop(self) -> None: ...


def vllm_eval_args(
    base_dir: str | Path,
    adapters: Mapping[str, str | Path],
    *,
    tensor_parallel_size: int = 1,
    max_lora_rank: int = 16,
    dtype: str = "auto",
    revision: str | None = None,
    max_model_len: int | None = None,
) -> list[str]:
    """vLLM's arguments for an evaluation: the base, its parallelism, the arms' adapters.

    Args:
        base_dir: the base model directory (or hub id).
        adapters: served name -> PEFT adapter directory.
        tensor_parallel_size: GPUs the base is split over (the serving pod's ``gpus``).
        max_lora_rank: vLLM's ``--max-lora-rank`` (the spec's ``serving.max_lora_rank``).
        dtype: the spec's ``base.dtype`` (vLLM takes the same names).
        revision: the base's hub revision, if any.
        max_model_len: the longest sequence; ``None``: the model's own limit.

    Returns:
        The arguments after ``python -m vllm.entrypoints.openai.api_server``, without the
        socket (:class:`VllmEvalEngine` adds ``--uds``).
    """
    args = [
        *("--model", str(base_dir), "--served-model-name", BASE_NAME),
        *("--dtype", dtype, "--tensor-parallel-size", str(max(1, tensor_parallel_size))),
        # Greedy means argmax: no sampling defaults from the model's generation_config.json.
        *("--generation-config", "vllm"),
    ]
    if revision:
        args += ["--revision", revision]
    if max_model_len is not None:
        args += ["--max-model-len", str(max_model_len)]
    if adapters:
        args += ["--enable-lora", "--max-lora-rank", str(max_lora_rank)]
        args += ["--max-loras", str(len(adapters)), "--lora-modules"]
        args += [f"{name}={Path(path).resolve()}" for name, path in adapters.items()]
    return args


class VllmEvalEngine:
    """vLLM serving the base and the arms' adapters, for the evaluators (a context manager).

    Args:
        base_dir: the base model directory (or hub id).
        adapters: adapter name -> PEFT adapter directory (the names the arms use).
        launch: makes the child process from its command line and socket path; in the
            pipeline :class:`lorafleet.serve.vllm_front.VllmProcess`.
        tensor_parallel_size: GPUs the base is split over.
        max_lora_rank: vLLM's ``--max-lora-rank``.
        dtype: the base's dtype name.
        revision: the base's hub revision.
        max_model_len: the longest sequence vLLM holds; ``None``: the model's own limit.
        python: the interpreter with vLLM (default ``$LORAFLEET_VLLM_PYTHON``, else this one).
        startup_timeout_s: how long vLLM may take to become healthy.
        request_timeout_s: the longest one request may take.
    """

    def __init__(
        self,
        base_dir: str | Path,
        adapters: Mapping[str, str | Path],
        launch: Callable[[list[str], str], ServerProcess],
        *,
        tensor_parallel_size: int = 1,
        max_lora_rank: int = 16,
        dtype: str = "auto",
        revision: str | None = None,
        max_model_len: int | None = None,
        python: str | None = None,
        startup_timeout_s: float = 900.0,
        request_timeout_s: float = 600.0,
    ) -> None:
        from transformers import AutoTokenizer

        self.adapters = dict(adapters)
        self.args = vllm_eval_args(
            base_dir,
            adapters,
            tensor_parallel_size=tensor_parallel_size,
            max_lora_rank=max_lora_rank,
            dtype=dtype,
            revision=revision,
            max_model_len=max_model_len,
        )
        self.python = python or os.environ.get("LORAFLEET_VLLM_PYTHON") or sys.executable
        self.launch = launch
        self.startup_timeout_s, self.request_timeout_s = startup_timeout_s, request_timeout_s
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir, revision=revision)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._dir: Path | None = None
        self._process: ServerProcess | None = None
        self._client: httpx.Client | None = None

    def command(self, uds: str) -> list[str]:
        """vLLM's command line, listening on the Unix socket ``uds``."""
        return [self.python, "-m", VLLM_ENTRY_POINT, *self.args, "--uds", uds]

    def __enter__(self) -> VllmEvalEngine:
        self._check_python()
        self._dir = Path(tempfile.mkdtemp(prefix="lorafleet-eval-vllm-"))  # 0700
        uds = str(self._dir / "vllm.sock")
        self._process = self.launch(self.command(uds), uds)
        self._client = httpx.Client(
            transport=httpx.HTTPTransport(uds=uds),
            base_url="http://vllm",
            timeout=self.request_timeout_s,
        )
        try:
            self._process.start()
            self._wait_healthy()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stop vLLM and remove its socket directory. Idempotent."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._process is not None:
            self._process.stop()
            self._process = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _check_python(self) -> None:
        """Refuse, in one line, an interpreter without vLLM (before anything starts)."""
        probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
        try:
            found = subprocess.run([self.python, "-c", probe], timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            found = False
        if not found:
            raise LorafleetError(
                f"vLLM is not installed for {self.python}: evaluating through vLLM (gate.engine "
                "vllm, or auto with serving.gpus > 1) needs it; the CUDA component image has it "
                "(make image-gpu), or set $LORAFLEET_VLLM_PYTHON to an interpreter that has it"
            )

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if not self._process.alive():
                raise LorafleetError(
                    f"vLLM exited with code {self._process.returncode} before it was healthy "
                    "(its log is above); command: " + " ".join(self.args)
                )
            try:
                if self._client.get("/health", timeout=5.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise LorafleetError(
                    f"vLLM not healthy after {self.startup_timeout_s:.0f} s (its log is above)"
                )
            time.sleep(0.5)

    def _post(self, body: dict) -> dict:
        if self._client is None:
            raise LorafleetError("the vLLM engine is not started: use it as a context manager")
        try:
            response = self._client.post("/v1/completions", json=body)
        except httpx.TransportError as exc:
            alive = self._process is not None and self._process.alive()
            state = "running" if alive else f"exited with code {self._process.returncode}"
            raise LorafleetError(f"vLLM unreachable ({state}): {exc}") from None
        if response.status_code != 200:
            raise LorafleetError(
                f"vLLM refused a request ({response.status_code}): {openai_error_line(response)}"
            )
        return response.json()["choices"][0]

    def _served(self, adapter: str | None) -> str:
        if adapter is None:
            return BASE_NAME
        if adapter not in self.adapters:
            raise LorafleetError(
                f"unknown adapter {adapter!r}; loaded: {', '.join(self.adapters) or 'none'}"
            )
        return adapter

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """A request's prompt as the Generator tokenises it (:func:`prompt_token_ids`)."""
        return prompt_token_ids(self.tokenizer, request)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """One greedy generation.

        Raises:
            LorafleetError: vLLM refused the request (e.g. longer than ``max_model_len``)
                or is gone.
        """
        ids = self.prompt_ids(request)
        choice = self._post(
            {
                "model": self._served(request.adapter),
                "prompt": ids,
                "max_tokens": request.max_new_tokens,
                "temperature": 0.0,
                "stop": list(request.stop),
                "ignore_eos": request.ignore_eos,
                "return_token_ids": True,
            }
        )
        if choice["finish_reason"] not in ("stop", "length"):
            raise LorafleetError(f"vLLM ended a generation with {choice['finish_reason']!r}")
        return GenerationResult(
            text=choice["text"],
            token_ids=list(choice["token_ids"]),
            prompt_tokens=len(ids),
            finish_reason=choice["finish_reason"],
        )

    def generate_all(
        self,
        requests: Sequence[GenerationRequest],
        batch_size: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[GenerationResult]:
        """Greedy generations for all requests, ``batch_size`` of them in flight at a time
        (vLLM batches what is in flight).

        Returns:
            One result per request, in the order of ``requests``.
        """
        results: list[GenerationResult] = []
        with ThreadPoolExecutor(max(1, batch_size)) as pool:
            for start in range(0, len(requests), batch_size):
                chunk = requests[start : start + batch_size]
                results += pool.map(self.generate, chunk)
                if on_batch is not None:
                    on_batch(len(chunk))
        return results

    def heldout_loss(
        self,
        adapter: str | None,
        records: Sequence[Record],
        batch_size: int = 8,
        max_seq_len: int = 2048,
    ) -> dict:
        """Token-weighted NLL of the records' assistant turns, from vLLM's prompt logprobs.

        Each conversation goes as one prompt of token ids with ``prompt_logprobs: 0`` (the
        logprob of each prompt token given the ones before it) and ``max_tokens: 1``. One
        request at a time: vLLM 0.32's CPU LoRA path fails on prompt logprobs of several
        requests in one batch. ``batch_size`` is accepted for the Generator's signature.

        Returns:
            ``{"loss", "perplexity", "tokens"}`` (:func:`~lorafleet.evaluate.loss.loss_summary`).
        """
        del batch_size
        model = self._served(adapter)
        total, count = 0.0, 0
        for example in encode_records(self.tokenizer, records, max_seq_len):
            choice = self._post(
                {
                    "model": model,
                    "prompt": example.input_ids,
                    "max_tokens": 1,
                    "temperature": 0.0,
                    "prompt_logprobs": 0,
                }
            )
            logprobs = choice["prompt_logprobs"]  # T entries; the first is None
            for t in range(1, len(example.input_ids)):
                if example.labels[t] != IGNORE_INDEX:
                    total -= logprobs[t][str(example.input_ids[t])]["logprob"]
                    count += 1
        return loss_summary(total, count)
