"""The fleet report: a self-contained HTML page (inline SVG, no CDN), Markdown and a terminal table.

An expert whose step failed (its entry carries ``failure``: the step and the error) is
listed with the failure in place of its numbers.

Also one expert's evaluation: candidate vs the base model vs production per metric, as
Markdown (the KFP UI), flat numbers (a KFP Metrics artifact) and grouped bar charts.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

__all__ = [
    "ARMS",
    "comparison",
    "failure_line",
    "gate_line",
    "kfp_metrics",
    "kfp_train_metrics",
    "loss_svg",
    "metric_bars_svg",
    "readable_reply",
    "render_eval_html",
    "render_eval_markdown",
    "render_html",
    "render_markdown",
    "rich_eval_table",
    "rich_table",
]

# Arms of an evaluation, in the order tables and charts show them, with their bar colours.
ARMS = {"candidate": "#2563eb", "base": "#9ca3af", "production": "#f59e0b"}

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
        f"{pad + i * (width - 2 * pad) / n:.1f},{pad + (hi - v) * (height - 2 * pad) / span:.1f}"
        for i, v in enumerate(losses)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="training loss from {losses[0]:.3f} to {losses[-1]:.3f}">'
        f'<rect width="100%" height="100%" fill="#fafafa" stroke="#ddd"/>'
        f'<polyline fill="none" stroke="#2563eb" stroke-width="1.5" points="{pts}"/>'
        f'<text x="{pad}" y="{height - 2}" font-size="10" fill="#555">step 1..{len(losses)}: '
        f"{losses[0]:.3f} → {losses[-1]:.3f}</text></svg>"
    )


def comparison(report: dict) -> dict[str, dict[str, float | None]]:
    """Every gated metric of an evaluation: metric -> {arm: value} for the arms evaluated."""
    arms = [a for a in ARMS if f"metrics_{a}" in report]
    names = dict.fromkeys(k for a in arms for k in report[f"metrics_{a}"])
    return {k: {a: report[f"metrics_{a}"].get(k) for a in arms} for k in names}


def metric_bars_svg(rows: dict[str, dict[str, float | None]], width: int = 520) -> str:
    """An inline SVG grouped bar chart: one group per metric, one bar per arm (scores in [0, 1])."""
    if not rows:
        return "<svg></svg>"
    arms = list(next(iter(rows.values())))
    bar, gap, label_w, pad = 9, 8, 150, 6
    group_h = bar * len(arms) + gap
    height = pad * 2 + 16 + group_h * len(rows)
    plot_w = width - label_w - 50
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="metrics per arm: {", ".join(arms)}"><rect width="100%" height="100%" fill="#fafafa" stroke="#ddd"/>'
    ]
    for i, arm in enumerate(arms):
        x = label_w + i * 95
        parts.append(f'<rect x="{x}" y="{pad}" width="10" height="10" fill="{ARMS[arm]}"/>')
        parts.append(f'<text x="{x + 14}" y="{pad + 9}" font-size="10" fill="#333">{arm}</text>')
    for g, (metric, values) in enumerate(rows.items()):
        top = pad + 16 + g * group_h
        parts.append(
            f'<text x="{label_w - 6}" y="{top + group_h / 2}" font-size="10" text-anchor="end" fill="#333">{_escape(metric)}</text>'
        )
        for i, arm in enumerate(arms):
            value = values.get(arm)
            y = top + i * bar
            w = 0.0 if value is None else max(0.0, min(1.0, value)) * plot_w
            shown = "-" if value is None else f"{value:.3f}"
            parts.append(
                f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar - 1}" fill="{ARMS[arm]}"><title>{arm} {shown}</title></rect>'
            )
            parts.append(
                f'<text x="{label_w + w + 3:.1f}" y="{y + bar - 2}" font-size="8" fill="#555">{shown}</text>'
            )
    return "".join(parts) + "</svg>"


def _judge_line(report: dict) -> str | None:
    judge = report.get("judge")
    if not judge or judge.get("win_rate") is None:
        return None
    o = judge["outcomes"]
    return (
        f"judge {judge.get('model', '')} vs {judge['reference']}: win rate {judge['win_rate']:.3f} "
        f"({judge['confidence']:.0%} CI {judge['ci_low']:.3f}-{judge['ci_high']:.3f}) over {judge['items']} items x 2 orders: "
        f"{o['win']} won, {o['loss']} lost, {o['tie']} tied, {o['unparseable']} unparseable (not scored; parse rate {judge.get('parse_rate')})"
    )


def render_eval_markdown(report: dict) -> str:
    """One expert's evaluation and gate as Markdown: verdict, rules, metrics per arm, judge."""
    arms = [a for a in ARMS if f"metrics_{a}" in report]
    head = "| metric | " + " | ".join(arms) + " |\n|---|" + "---|" * len(arms) + "\n"
    loss = (
        "| held-out loss | " + " | ".join(f"{report[f'eval_loss_{a}']:.4f}" for a in arms) + " |\n"
    )
    rows = "".join(
        f"| {k} | " + " | ".join("-" if v.get(a) is None else f"{v[a]:.3f}" for a in arms) + " |\n"
        for k, v in comparison(report).items()
    )
    out = f"## `{report.get('expert', report.get('task', 'candidate'))}`"
    if "gate_passed" in report:
        out += f": gate {'PASSED' if report['gate_passed'] else 'FAILED'}\n\n| rule | result | value | threshold |\n|---|---|---|---|\n"
        out += "".join(
            f"| {r['rule']} | {'pass' if r['passed'] else 'FAIL'} | {r['value']} | {r['threshold']} |\n"
            for r in report["gate_rules"]
        )
    out += "\n" + head + loss + rows
    judge = _judge_line(report)
    return out + (f"\n{judge}\n" if judge else "")


def kfp_metrics(report: dict) -> dict[str, float]:
    """Flat numbers of an evaluation (and its gate) for a KFP Metrics artifact."""
    out = {}
    for arm in (a for a in ARMS if f"metrics_{a}" in report):
        out[f"eval_loss_{arm}"] = report[f"eval_loss_{arm}"]
        out.update({f"{arm}_{k}": v for k, v in report[f"metrics_{arm}"].items()})
    judge = report.get("judge")
    if judge and judge.get("win_rate") is not None:
        out.update(
            {
                "judge_win_rate": judge["win_rate"],
                "judge_ci_low": judge["ci_low"],
                "judge_ci_high": judge["ci_high"],
            }
        )
    if "gate_passed" in report:
        out["gate_passed"] = float(report["gate_passed"])
    return out


def kfp_train_metrics(result: dict) -> dict[str, float]:
    """Flat numbers of a training run (``TrainResult.to_dict()``) for a KFP Metrics artifact;
    throughput in model FLOPs, and MFU only where the device's peak is known."""
    out = {
        "final_loss": round(result["losses"][-1], 5),
        "steps": result["steps"],
        "tokens_per_s": result["tokens_per_s"],
    }
    if result.get("tflops_per_s"):
        out["model_tflops_per_s"] = result["tflops_per_s"]
    if result.get("mfu") is not None:
        out["mfu"] = result["mfu"]
    return out


def failure_line(x: dict) -> str | None:
    """``failed in STEP: ERROR`` for an expert whose step failed; ``None`` otherwise."""
    failure = x.get("failure")
    return f"failed in {failure['stage']}: {failure['error']}" if failure else None


def gate_line(x: dict) -> str:
    """Why the gate passed or failed, in terms of the task's primary metric."""
    if failed := failure_line(x):
        return failed
    primary = x.get("primary_metric", "token_f1")
    base = x.get("metrics_base", {}).get(primary)
    cand = x.get("metrics_candidate", {}).get(primary)
    if base is None or cand is None:
        moved = f"{primary} not measured"
    else:
        delta = cand - base
        better = delta < 0 if x.get("primary_direction") == "lower" else delta > 0
        verb = "unchanged" if abs(delta) < 5e-5 else ("improved" if better else "worsened")
        moved = f"{primary} {verb} from base {base:.3f} to {cand:.3f} ({delta:+.3f})"
    if x.get("gate_passed"):
        held = len(x.get("gate_rules", []))
        return f"passed: {moved}; all {held} gate rules held"
    failing = [r for r in x.get("gate_rules", []) if not r.get("passed")]
    why = "; ".join(r.get("message", r.get("rule", "")) for r in failing[:2])
    more = f" (and {len(failing) - 2} more)" if len(failing) > 2 else ""
    return f"failed: {why}{more}; {moved}"


_BLANK_RUNS = re.compile(r"\n\s*\n(\s*\n)+")


def readable_reply(text: str, fold: int = 400) -> tuple[str, str]:
    """A generated reply as people read it: runs of blank lines collapsed to one, leading and
    trailing blank space dropped, and the text split into what is shown (up to ``fold``
    characters, cut at a word) and the rest (shown folded)."""
    text = _BLANK_RUNS.sub("\n\n", text).strip()
    if not text:
        return "(empty reply)", ""
    if len(text) <= fold:
        return text, ""
    cut = text.rfind(" ", 0, fold)
    cut = cut if cut > fold // 2 else fold
    return text[:cut], text[cut:]


def _reply_html(label: str, text: str) -> str:
    e = _escape
    shown, rest = readable_reply(text)
    folded = f"<details><summary>more</summary><code>{e(rest)}</code></details>" if rest else ""
    return f"<div class='reply'><b>{e(label)}</b><br><code>{e(shown)}</code>{folded}</div>"


def _metric_cells(e: dict) -> str:
    primary = e.get("primary_metric", "token_f1")
    base, cand = e.get("metrics_base", {}).get(primary), e.get("metrics_candidate", {}).get(primary)
    return f"{primary}: {base} → {cand}"


def render_markdown(summary: dict) -> str:
    """A Markdown table of the fleet (shown in the KFP UI), then why each gate decided."""
    rows, why = [], []
    for name, e in summary["experts"].items():
        if e.get("failure"):
            rows.append(f"| {name} | - | - | - | FAILED ({e['failure']['stage']}) | - | no |")
            why.append(f"- **{name}**: {failure_line(e)}")
            continue
        rows.append(
            f"| {name} | {e['eval_loss_base']:.4f} | {e['eval_loss_candidate']:.4f} | {_metric_cells(e)} | "
            f"{'pass' if e['gate_passed'] else 'FAIL'} | {e.get('adapter_version') or '-'} | {'yes' if e['served'] else 'no'} |"
        )
        why.append(f"- **{name}**: gate {gate_line(e)}")
    return (
        f"# Fleet `{summary['fleet']}`\n\n| expert | loss base | loss candidate | task metric | gate | version | served |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n" + "\n".join(why) + "\n"
    )


_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2rem;max-width:1100px;color:#222}"
    "table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.25rem .5rem;font-size:.9rem}"
    ".row{display:flex;gap:1.5rem;align-items:flex-start}.ok{color:#15803d}.bad{color:#b91c1c}"
    "h2 span{font-size:.8rem;margin-left:.5rem}section{border-top:1px solid #eee;padding-top:.5rem}"
    "code{white-space:pre-wrap;font-size:.8rem}.reply{margin:.4rem 0}.why{font-weight:600}"
)


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{body}</body></html>\n"
    )


def _eval_block(x: dict) -> str:
    """An evaluation in HTML: held-out loss per arm, metric table and bars per arm, judge, gate reasons."""
    e = _escape
    rows = comparison(x)
    arms = [a for a in ARMS if f"metrics_{a}" in x]
    metrics = "".join(
        f"<tr><td>{e(k)}</td>" + "".join(f"<td>{v.get(a)}</td>" for a in arms) + "</tr>"
        for k, v in rows.items()
    )
    judge = _judge_line(x)
    losses = " · ".join(f"{a} <b>{x[f'eval_loss_{a}']:.4f}</b>" for a in arms)
    production = (
        f" (production: {e(x['production_version'])})" if x.get("production_version") else ""
    )
    return (
        f"<p>held-out loss: {losses}{production}</p>"
        "<div class='row'><table><tr><th>metric</th>"
        + "".join(f"<th>{a}</th>" for a in arms)
        + f"</tr>{metrics}</table>"
        f"<div>{metric_bars_svg(rows)}</div></div>"
        + (f"<p>{e(judge)}</p>" if judge else "")
        + "<ul>"
        + "".join(f"<li>{e(r)}</li>" for r in x.get("gate_reasons", []))
        + "</ul>"
    )


def _verdict(x: dict) -> str:
    return f"<span class='{'ok' if x['gate_passed'] else 'bad'}'>{'gate passed' if x['gate_passed'] else 'gate failed'}</span>"


def render_eval_html(report: dict) -> str:
    """One evaluation (``lorafleet eval run``) as an HTML page that opens offline."""
    title = f"{report.get('expert') or report.get('task', '')}: candidate {report.get('adapter') or ''}".strip()
    verdict = _verdict(report) if "gate_passed" in report else ""
    return _page(
        f"lorafleet eval: {title}",
        f"<h1>Evaluation</h1><section><h2>{_escape(title)} {verdict}</h2>{_eval_block(report)}</section>",
    )


def render_html(summary: dict) -> str:
    """The whole report as one HTML page that opens offline."""
    e = _escape
    cards = []
    for name, x in summary["experts"].items():
        if x.get("failure"):
            cards.append(
                f"<section><h2>{e(name)} <span class='bad'>failed in "
                f"{e(x['failure']['stage'])}</span></h2><p class='why'>{e(failure_line(x))}</p>"
                "<p>nothing registered, nothing served; the other experts went on</p></section>"
            )
            continue
        reply = x.get("reply") or {}
        samples = x.get("samples_candidate") or []
        cards.append(
            f"<section><h2>{e(name)} <small>({e(x['task'])})</small> {_verdict(x)}</h2>"
            f"<p class='why'>gate {e(gate_line(x))}</p>"
            f"<div class='row'><div>{loss_svg(x['train']['losses'])}</div><div>"
            f"<p>trained {x['train']['steps']} steps on {x['curation']['output']['total']} records "
            f"({x['curation']['output']['human']} human, {x['curation']['output']['synthetic']} synthetic); "
            f"{x['train']['tokens_per_s']:.0f} tokens/s</p>"
            f"<p>adapter: {e(str(x.get('adapter_uri') or 'not registered'))}</p></div></div>"
            + _eval_block(x)
            + "".join(
                _reply_html(f"candidate answer {i} (eval set)", t) for i, t in enumerate(samples, 1)
            )
            + (
                _reply_html(f"served reply (HTTP {reply.get('status')})", reply.get("text", ""))
                if reply
                else ""
            )
            + "</section>"
        )
    overview = render_markdown(summary).split("\n", 2)[2].split("\n\n")[0]
    head_rows = "".join(
        "<tr>" + "".join(f"<td>{e(c.strip())}</td>" for c in line.strip("|").split("|")) + "</tr>"
        for line in overview.splitlines()[2:]
        if line.startswith("|")
    )
    return _page(
        f"lorafleet report: {summary['fleet']}",
        f"<h1>Fleet {e(summary['fleet'])}</h1>"
        f"<p>base: {e(str(summary['base']))} · run wall time: {summary.get('wall_time_s', '-')} s</p>"
        "<table><tr><th>expert</th><th>loss base</th><th>loss candidate</th><th>task metric</th><th>gate</th>"
        f"<th>version</th><th>served</th></tr>{head_rows}</table>" + "".join(cards),
    )


def rich_eval_table(reports: dict[str, dict]):
    """Evaluations side by side as a ``rich`` table: a column per report and arm, and the change
    between the first and the last report's candidate when there are several."""
    from rich.table import Table

    columns = [
        (label, arm) for label, r in reports.items() for arm in ARMS if f"metrics_{arm}" in r
    ]
    table = Table(title="evaluation")
    table.add_column("metric")
    for label, arm in columns:
        table.add_column(arm if len(reports) == 1 else f"{label}\n{arm}", justify="right")
    values = list(reports.values())
    first, last = values[0], values[-1]
    compare = len(reports) > 1
    if compare:
        table.add_column("change", justify="right")

    def cell(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    def row(name: str, get) -> None:
        values = [get(reports[label], arm) for label, arm in columns]
        change = []
        if compare:
            a, b = get(first, "candidate"), get(last, "candidate")
            change = ["-" if a is None or b is None else f"{b - a:+.4f}"]
        table.add_row(name, *map(cell, values), *change)

    row("held-out loss", lambda r, arm: r.get(f"eval_loss_{arm}"))
    for metric in dict.fromkeys(k for r in reports.values() for k in comparison(r)):
        row(metric, lambda r, arm, metric=metric: r.get(f"metrics_{arm}", {}).get(metric))
    if any("gate_passed" in r for r in reports.values()):
        gates = [
            "[green]pass[/]" if reports[label].get("gate_passed") else "[red]FAIL[/]"
            for label, _ in columns
        ]
        table.add_row("gate", *gates, *([""] if compare else []))
    return table


def rich_table(summary: dict):
    """The summary as a ``rich`` table for the terminal."""
    from rich.table import Table

    table = Table(title=f"fleet {summary['fleet']}")
    for col in ("expert", "loss base", "loss cand.", "task metric", "gate", "version", "served"):
        table.add_column(col)
    for name, x in summary["experts"].items():
        if x.get("failure"):
            failed = f"[red]FAILED ({x['failure']['stage']})[/]"
            table.add_row(name, "-", "-", x["failure"]["error"], failed, "-", "no")
            continue
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
