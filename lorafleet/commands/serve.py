"""``lorafleet serve``: the serving runtime's command line, defined once.

``lorafleet serve`` and ``python -m lorafleet.serve.runtime`` (the runtime image's entry
point, :func:`standalone_app`) run this one command, so their options cannot drift.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from lorafleet.engine.devices import DTYPES
from lorafleet.errors import LorafleetError
from lorafleet.serve.auth import DEFAULT_RPM, ApiKeys
from lorafleet.serve.limits import RequestLimits

__all__ = ["API_KEYS_HELP", "RPM_HELP", "serve", "standalone_app"]

# Shared with `lorafleet router` (commands/router.py): one wording, one default.
API_KEYS_HELP = (
    "File of API keys, one NAME:KEY[:RPM] per line; when set, /openai/v1 needs "
    "'Authorization: Bearer KEY' (401 otherwise, 429 over the key's rate). Unset: open."
)
RPM_HELP = "Requests per minute of an API key whose line sets none."


def serve(
    base: Annotated[
        str, typer.Option(metavar="DIR|HUB_ID", help="Base model directory or hub id.")
    ],
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME=SOURCE",
            help="An adapter and where it is (directory, pvc://, s3://, gs://); repeat for more.",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 inside a pod.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8080,
    name: Annotated[str, typer.Option(help="Served name of the base model.")] = "base",
    max_batch_size: Annotated[
        int, typer.Option(min=1, help="Most requests decoding at once (continuous batching).")
    ] = 64,
    prefill_chunk_tokens: Annotated[
        int,
        typer.Option(
            min=1,
            help="Prompt tokens prefilled per step between two decode steps (padding "
            "included): the longest a running request waits for newcomers' prompts.",
        ),
    ] = 256,
    max_wait_ms: Annotated[
        float,
        typer.Option(
            help="When nothing runs, how long a request waits for others to share its prefill."
        ),
    ] = 10.0,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            metavar="N",
            help="Torch CPU threads of the model; default: the CPUs this process may use, "
            "less one for the HTTP side, at least 1.",
        ),
    ] = None,
    max_queue: Annotated[
        int, typer.Option(help="Most requests waiting; more get 429 + Retry-After.")
    ] = 256,
    request_timeout: Annotated[
        float, typer.Option(help="Seconds a request may take, queueing included; later 503.")
    ] = 120.0,
    max_rank: Annotated[int, typer.Option(help="Largest LoRA rank admitted.")] = 64,
    # A plain flag (no --no- twin, no <bool> type): the help keeps its room for the text.
    require_lineage: Annotated[
        bool,
        typer.Option(
            "--require-lineage",
            metavar="",
            help="Refuse adapters without lineage.json (default: check it when present).",
        ),
    ] = False,
    routes: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help='JSON file {"routes": {NAME: {"targets": [...]}}} of weighted adapter versions.',
        ),
    ] = None,
    admin_token_env: Annotated[
        str,
        typer.Option(
            help="Environment variable holding the /admin bearer token; unset disables /admin."
        ),
    ] = "LORAFLEET_ADMIN_TOKEN",
    adapter_cache: Annotated[
        Path | None,
        typer.Option(metavar="DIR", help="Download directory of s3:// and gs:// adapters."),
    ] = None,
    lora_backend: Annotated[
        str,
        typer.Option(
            metavar="batched|peft",
            help="batched: all adapters stacked, one pass per LoRA layer; peft: PEFT's per-adapter loop (the reference).",
        ),
    ] = "batched",
    max_tokens_limit: Annotated[
        int,
        typer.Option(min=1, help="Largest max_tokens a request may ask for; more get 400."),
    ] = RequestLimits.max_tokens,
    max_prompt_chars: Annotated[
        int,
        typer.Option(
            min=1, help="Longest prompt (all message contents), in characters; more get 400."
        ),
    ] = RequestLimits.max_prompt_chars,
    max_body_bytes: Annotated[
        int, typer.Option(min=1, help="Largest request body in bytes; more get 400.")
    ] = RequestLimits.max_body_bytes,
    api_keys_file: Annotated[
        Path | None,
        typer.Option(metavar="FILE", envvar="LORAFLEET_API_KEYS_FILE", help=API_KEYS_HELP),
    ] = None,
    api_key_rpm: Annotated[int, typer.Option(min=1, help=RPM_HELP)] = DEFAULT_RPM,
    revision: Annotated[
        str | None,
        typer.Option(
            help="Hub revision of the base (a commit, tag or branch; the spec's base.revision)."
        ),
    ] = None,
    dtype: Annotated[
        str,
        typer.Option(
            help="Weight dtype: auto (bf16 on a GPU that supports it, else float32), float32, bfloat16 or float16."
        ),
    ] = "auto",
    fault: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME:KEY=VALUE,...",
            help="Canary drills only: NAME:KEY=VALUE,... makes adapter NAME fail or slow down (keys: error_rate, added_latency_ms, status); repeat for more; also settable at /admin/faults.",
        ),
    ] = None,
) -> None:
    """Serve the base and adapters: OpenAI-compatible API, KServe health, /metrics and /admin.

    Every adapter is checked before it serves (safetensors, rank, target modules, base
    fingerprint, shapes, effect on the output); a failed check is one line and exit code 2.
    The runtime image runs the same command as python -m lorafleet.serve.runtime.
    """
    # The serving stack (kserve, torch) loads only when a server starts: `lorafleet --help` stays fast.
    from lorafleet.serve.faults import FaultTable, parse_fault
    from lorafleet.serve.routes import RouteTable
    from lorafleet.serve.server import serve as run_server

    if lora_backend not in ("batched", "peft"):
        raise LorafleetError(f"--lora-backend {lora_backend!r}: expected batched or peft")
    if dtype not in ("auto", *DTYPES):
        raise LorafleetError(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    adapters = {}
    for item in adapter or []:
        adapter_name, sep, path = item.partition("=")
        if not sep or not adapter_name or not path:
            raise LorafleetError(f"--adapter {item!r}: expected NAME=SOURCE")
        if adapter_name in adapters:
            raise LorafleetError(f"--adapter {item!r}: name {adapter_name!r} given twice")
        adapters[adapter_name] = path
    faults = FaultTable(dict(parse_fault(f) for f in fault or []))
    keys = ApiKeys.from_file(api_keys_file, api_key_rpm) if api_keys_file else None
    run_server(
        base,
        adapters,
        host=host,
        port=port,
        name=name,
        max_batch_size=max_batch_size,
        max_wait_s=max_wait_ms / 1000,
        prefill_chunk_tokens=prefill_chunk_tokens,
        threads=threads or max(1, _usable_cpus() - 1),
        admin_token=os.environ.get(admin_token_env) or None,
        api_keys=keys,
        max_queue=max_queue,
        request_timeout_s=request_timeout,
        limits=RequestLimits(max_tokens_limit, max_prompt_chars, max_body_bytes),
        max_rank=max_rank,
        require_lineage=require_lineage,
        routes=RouteTable.from_file(routes) if routes else None,
        adapter_cache=str(adapter_cache) if adapter_cache else None,
        faults=faults,
        lora_backend=lora_backend,
        revision=revision,
        dtype=dtype,
    )


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def standalone_app() -> typer.Typer:
    """The serve command alone: ``python -m lorafleet.serve.runtime`` (the runtime image)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(serve)
    return app
