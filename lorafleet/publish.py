"""The pipeline's last step: serve the base and every registered adapter, ask each one
question over real HTTP, and write the fleet summary and report."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from lorafleet.fleet import FleetSpec
from lorafleet.io import atomic_write_json, atomic_write_text
from lorafleet.llm import CompletionError, RetryPolicy, chat, make_client
from lorafleet.registry import fetch_adapter
from lorafleet.report import render_html, render_markdown
from lorafleet.serve.runtime import run_server_subprocess

__all__ = ["ask_each_adapter", "publish_fleet"]

log = logging.getLogger(__name__)


def ask_each_adapter(
    base_url: str,
    probes: dict[str, list[dict]],
    max_tokens: int = 48,
    retry: RetryPolicy | None = None,
) -> dict[str, dict]:
    """Send one chat completion per adapter (``model`` = adapter name) and record the answer.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8080`` (requests go to ``/openai/v1``).
        probes: adapter name -> the chat to send it.
        max_tokens: reply budget.
        retry: how failed requests are retried (default: the project's policy).

    Returns:
        Adapter name -> ``{"status", "latency_s", "model", "text"}``; a request that failed
        for good has the HTTP status that refused it (0 for no usable answer) and the reason
        as ``text``.
    """
    retry = retry or RetryPolicy()
    replies = {}
    # The fleet server is local and keyless: no key source, a placeholder key.
    with make_client(base_url.rstrip("/") + "/openai/v1", None, timeout_s=120) as client:
        for name, messages in probes.items():
            start = time.perf_counter()
            try:
                answer = chat(client, retry, model=name, messages=messages, max_tokens=max_tokens)
                status, model, text = 200, answer.model, answer.text
            except CompletionError as exc:
                status, model, text = exc.status or 0, None, str(exc)[:300]
            replies[name] = {
                "status": status,
                "latency_s": round(time.perf_counter() - start, 3),
                "model": model,
                "text": text,
            }
    return replies


def publish_fleet(
    spec: FleetSpec,
    base_dir: str,
    outcomes: list[dict],
    summary_path: str | Path,
    report_path: str | Path,
    markdown_path: str | Path,
) -> dict:
    """Serve what passed its gate, check it answers, and write summary/report.

    Each registered adapter is read from its ``adapter_uri`` through the storage layer
    (downloaded when it is in a bucket), as another pod would read it.

    Args:
        spec: the fleet spec.
        base_dir: the base model.
        outcomes: one per expert, from ``register`` or ``reject``; that of an expert whose
            step failed carries ``failure`` and is listed, not served.
        summary_path: where summary.json goes.
        report_path: where report.html goes.
        markdown_path: where the Markdown table goes.

    Returns:
        The summary: ``experts`` (name -> outcome, ``served`` and ``reply``) and ``failed``
        (name -> its ``failure``: the step and the error).
    """
    registered = [o for o in outcomes if o.get("registered")]
    replies: dict[str, dict] = {}
    if registered:
        with tempfile.TemporaryDirectory(prefix="lorafleet-publish-") as work_dir:
            adapters = {
                o["expert"]: fetch_adapter(o["adapter_uri"], Path(work_dir) / o["expert"])
                for o in registered
            }
            # The spec's revision and dtype: a hub base is served as it was trained and gated.
            pinned = ["--revision", spec.base.revision] if spec.base.revision else []
            extra = [*pinned, "--dtype", spec.base.dtype]
            with run_server_subprocess(base_dir, adapters, extra_args=extra) as base_url:
                replies = ask_each_adapter(base_url, {o["expert"]: o["probe"] for o in registered})
    experts = {}
    for o in sorted(outcomes, key=lambda o: [e.name for e in spec.experts].index(o["expert"])):
        reply = replies.get(o["expert"])
        experts[o["expert"]] = {
            **{k: v for k, v in o.items() if k not in ("probe", "expert")},
            "served": bool(reply and reply["status"] == 200),
            "reply": reply,
        }
    summary = {
        "fleet": spec.name,
        "base": spec.base.model,
        "base_dir": base_dir,
        "experts": experts,
        "failed": {name: e["failure"] for name, e in experts.items() if e.get("failure")},
    }
    atomic_write_json(summary_path, summary)
    atomic_write_text(report_path, render_html(summary))
    atomic_write_text(markdown_path, render_markdown(summary))
    return summary
