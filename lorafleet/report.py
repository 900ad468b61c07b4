"""The fleet report: a self-contained HTML page (inline SVG, no CDN), Markdown and a terminal table."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

__all__ = ["loss_svg", "render_html", "render_markdown", "rich_table"]

# Control characters are not allowed in HTML; an untrained model can emit any byte.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _escape(text: str) -> str:
    return html.escape(_CONTROL.sub("\ufffd", text))


def loss_svg(losses: Sequence[float], width: int = 320, height: int = 120) -> str:
    """An inline SVG line chart of a loss curve."""
    if not losses:
        return "<svg></svg>"
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    pad = 8
    n = max(1, len(losses) - 1)
    pts = " ".join(
        f"{pad + i * (width - 2 * pad) / n:.1f},{pad + (hi - v) * (height - 2 * pad) / span:.1f}" for i, v in enumerate(losses)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="training loss from {losses[0]:.3f} to {losses[-1]:.3f}">'
        f'<rect width="100%" height="100%" fill="#fafafa" stroke="#ddd"/>'
        f'<polyline fill="none" stroke="#2563eb" stroke-width="1.5" points="{pts}"/>'
        f'<text x="{pad}" y="{height - 2}" font-size="10" fill="#555">step 1..{len(losses)}: '
        f"{losses[0]:.3f} → {losses[-1]:.3f}</text></svg>"
    )


def _metric_cells(e: dict) -> str:
    primary = e.get("primary_metric", "token_f1")
    base, cand = e.get("metrics_base", {}).get(primary), e.get("metrics_candidate", {}).get(primary)
    return f"{primary}: {base} → {cand}"


def render_markdown(summary: dict) -> str:
    """A Markdown table of the fleet (shown in the KFP UI)."""
    rows = []
    for name, e in summary["experts"].items():
        rows.append(
            f"| {name} | {e['eval_loss_base']:.4f} | {e['eval_loss_candidate']:.4f} | {_metric_cells(e)} | "
            f"{'pass' if e['gate_passed'] else 'FAIL'} | {e.get('adapter_version') or '-'} | {'yes' if e['served'] else 'no'} |"
        )
    return (
        f"# Fleet `{summary['fleet']}`\n\n| expert | loss base | loss candidate | task metric | gate | version | served |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def render_html(summary: dict) -> str:
    """The whole report as one HTML page that opens offline."""
    e = _escape
    cards = []
    for name, x in summary["experts"].items():
        reasons = "".join(f"<li>{e(r)}</li>" for r in x["gate_reasons"])
        metrics = "".join(
            f"<tr><td>{e(k)}</td><td>{x['metrics_base'].get(k)}</td><td>{v}</td></tr>" for k, v in x["metrics_candidate"].items()
        )
        reply = x.get("reply") or {}
        cards.append(
            f"<section><h2>{e(name)} <small>({e(x['task'])})</small> "
            f"<span class='{'ok' if x['gate_passed'] else 'bad'}'>{'gate passed' if x['gate_passed'] else 'gate failed'}</span></h2>"
            f"<div class='row'><div>{loss_svg(x['train']['losses'])}</div><div>"
            f"<p>held-out loss: base <b>{x['eval_loss_base']:.4f}</b> → candidate <b>{x['eval_loss_candidate']:.4f}</b>"
            + (f" (production {e(x['production_version'])}: {x['eval_loss_production']:.4f})" if x.get("production_version") else "")
            + "</p>"
            f"<p>trained {x['train']['steps']} steps on {x['curation']['output']['total']} records "
            f"({x['curation']['output']['human']} human, {x['curation']['output']['synthetic']} synthetic); "
            f"{x['train']['tokens_per_s']:.0f} tokens/s</p>"
            f"<p>adapter: {e(str(x.get('adapter_path') or 'not registered'))}</p></div></div>"
            f"<table><tr><th>metric</th><th>base</th><th>candidate</th></tr>{metrics}</table>"
            f"<ul>{reasons}</ul>"
            + (f"<p>served reply ({reply.get('status')}): <code>{e(reply.get('text', '')[:300])}</code></p>" if reply else "")
            + "</section>"
        )
    style = (
        "body{font-family:system-ui,sans-serif;margin:2rem;max-width:1100px;color:#222}"
        "table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.25rem .5rem;font-size:.9rem}"
        ".row{display:flex;gap:1.5rem;align-items:flex-start}.ok{color:#15803d}.bad{color:#b91c1c}"
        "h2 span{font-size:.8rem;margin-left:.5rem}section{border-top:1px solid #eee;padding-top:.5rem}"
        "code{white-space:pre-wrap;font-size:.8rem}"
    )
    overview = render_markdown(summary).split("\n", 2)[2]
    head_rows = "".join(
        "<tr>" + "".join(f"<td>{e(c.strip())}</td>" for c in line.strip("|").split("|")) + "</tr>"
        for line in overview.splitlines()[2:]
        if line.startswith("|")
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>lorafleet report: {e(summary['fleet'])}</title>"
        f"<style>{style}</style></head><body><h1>Fleet {e(summary['fleet'])}</h1>"
        f"<p>base: {e(str(summary['base']))} · run wall time: {summary.get('wall_time_s', '-')} s</p>"
        "<table><tr><th>expert</th><th>loss base</th><th>loss candidate</th><th>task metric</th><th>gate</th>"
        f"<th>version</th><th>served</th></tr>{head_rows}</table>" + "".join(cards) + "</body></html>\n"
    )


def rich_table(summary: dict):
    """The summary as a ``rich`` table for the terminal."""
    from rich.table import Table

    table = Table(title=f"fleet {summary['fleet']}")
    for col in ("expert", "loss base", "loss cand.", "task metric", "gate", "version", "served"):
        table.add_column(col)
    for name, x in summary["experts"].items():
        table.add_row(
            name,
            f"{x['eval_loss_base']:.4f}",
            f"{x['eval_loss_candidate']:.4f}",
            _metric_cells(x),
            "[green]pass[/]" if x["gate_passed"] else "[red]FAIL[/]",
            x.get("adapter_version") or "-",
            "yes" if x["served"] else "no",
        )
    return table
