"""The pipeline's last step: serve the base and every registered adapter, ask each one
question over real HTTP, and write the fleet summary and report."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from lorafleet.fleet import FleetSpec
from lorafleet.io import atomic_write_json, atomic_write_text
from lorafleet.report import render_html, render_markdown

__all__ = ["ask_each_adapter", "publish_fleet"]

log = logging.getLogger(__name__)


def ask_each_adapter(
    base_url: str, probes: dict[str, list[dict]], max_tokens: int = 48
) -> dict[str, dict]:
    """Send one chat completion per adapter (``model`` = adapter name) and record the answer."""
    import httpx

    replies = {}
    with httpx.Client(base_url=base_url, timeout=120) as client:
        for name, messages in probes.items():
            start = time.perf_counter()
            r = client.post(
                "/openai/v1/chat/completions",
                json={"model": name, "messages": messages, "max_tokens": max_tokens},
            )
            body = r.json()
            ok = r.status_code == 200
            replies[name] = {
                "status": r.status_code,
                "latency_s": round(time.perf_counter() - start, 3),
                "model": body.get("model") if ok else None,
                "text": body["choices"][0]["message"]["content"] if ok else str(body)[:300],
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

    Args:
        spec: the fleet spec.
        base_dir: the base model.
        outcomes: one per expert, from ``register`` or ``reject``.
        summary_path: where summary.json goes.
        report_path: where report.html goes.
        markdown_path: where the Markdown table goes.

    Returns:
        The summary.
    """
    from lorafleet.serve.runtime import run_server_subprocess

    adapters = {o["expert"]: o["adapter_path"] for o in outcomes if o.get("registered")}
    replies: dict[str, dict] = {}
    if adapters:
        with run_server_subprocess(base_dir, adapters) as base_url:
            replies = ask_each_adapter(
                base_url, {o["expert"]: o["probe"] for o in outcomes if o["expert"] in adapters}
            )
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
    }
    atomic_write_json(summary_path, summary)
    atomic_write_text(report_path, render_html(summary))
    atomic_write_text(markdown_path, render_markdown(summary))
    return summary
