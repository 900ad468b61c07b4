"""Data reports for people: self-contained HTML (inline CSS, no CDN) and Markdown.

GX's own Data Docs load their scripts and styles from CDNs and look broken offline and
inside the KFP UI's sandboxed viewer, so the validation report is rendered here from
the structured results. Component wrappers write these strings to ``HTML`` and
``Markdown`` output artifacts.
"""

from __future__ import annotations

import html
from pathlib import Path

from lorafleet.data.validate import ValidationReport
from lorafleet.report import _escape

__all__ = ["stats_markdown", "validation_html", "validation_markdown"]

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#1f2933}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0 16px}th,td{border:1px solid #d9e2ec;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f4f8}.ok{color:#1f7a3a;font-weight:600}.bad{color:#b42318;font-weight:600}.warn{color:#b54708;font-weight:600}
code{background:#f0f4f8;padding:0 3px;border-radius:3px}.muted{color:#627d98}
"""
MAX_LISTED = 200  # findings listed per file; the JSON result keeps them all


def _status(ok: bool, severity: str) -> str:
    if ok:
        return '<span class="ok">ok</span>'
    return (
        '<span class="bad">FAILED</span>'
        if severity == "critical"
        else '<span class="warn">warning</span>'
    )


def _findings_html(title: str, findings: list) -> str:
    if not findings:
        return ""
    rows = "".join(
        f"<tr><td>{f.line or '-'}</td><td><code>{_escape(f.rule)}</code></td><td>{_escape(f.detail)}</td></tr>"
        for f in findings[:MAX_LISTED]
    )
    more = (
        f'<p class="muted">and {len(findings) - MAX_LISTED} more in the JSON result</p>'
        if len(findings) > MAX_LISTED
        else ""
    )
    return f"<h3>{title}</h3><table><tr><th>line</th><th>rule</th><th>detail</th></tr>{rows}</table>{more}"


def validation_html(reports: list[ValidationReport], title: str = "Data validation") -> str:
    """One self-contained HTML page for the reports of one or more files."""
    sections = []
    for r in reports:
        exp_rows = "".join(
            f"<tr><td><code>{_escape(e['rule'])}</code></td><td>{e['severity']}</td>"
            f'<td class="muted">{_escape(e["expectation"])}</td><td>{_status(e["success"], e["severity"])}</td>'
            f"<td>{e['unexpected_count']}</td></tr>"
            for e in r.expectations
        )
        pii = ", ".join(f"{k}: {v}" for k, v in r.pii.items()) or "none found"
        sections.append(
            f'<h2>{_escape(Path(r.file).name)} <span class="muted">({_escape(r.task)})</span> '
            + ('<span class="ok">PASSED</span>' if r.success else '<span class="bad">FAILED</span>')
            + "</h2>"
            f"<p>{r.rows} records · {len(r.failures)} failing records · {len(r.warnings)} warnings · personal data: {html.escape(pii)}</p>"
            f"<table><tr><th>rule</th><th>severity</th><th>GX expectation</th><th>result</th><th>bad rows</th></tr>{exp_rows}</table>"
            + _findings_html("Failures", r.failures)
            + _findings_html("Warnings", r.warnings)
        )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>\n"
    )


def validation_markdown(reports: list[ValidationReport]) -> str:
    """A Markdown summary of the reports (the KFP UI renders Markdown artifacts)."""
    out = []
    for r in reports:
        rows = "\n".join(
            f"| {e['rule']} | {e['severity']} | {'ok' if e['success'] else ('FAILED' if e['severity'] == 'critical' else 'warning')} "
            f"| {e['unexpected_count']} |"
            for e in r.expectations
        )
        pii = ", ".join(f"{k}: {v}" for k, v in r.pii.items()) or "none"
        listed = "".join(f"- line {f.line}: `{f.rule}`: {f.detail}\n" for f in r.failures[:20])
        out.append(
            f"### Validation of `{Path(r.file).name}` ({r.task}): {'PASSED' if r.success else 'FAILED'}\n\n"
            f"{r.rows} records, {len(r.failures)} failing, {len(r.warnings)} warnings; personal data: {pii}.\n\n"
            f"| rule | severity | result | bad rows |\n|---|---|---|---|\n{rows}\n"
            + (f"\n{listed}" if listed else "")
        )
    return "\n".join(out)


def stats_markdown(stats: dict) -> str:
    """The curation stats (counts per stage, drops per reason) as Markdown."""
    stages = "\n".join(f"| {k} | {v} |" for k, v in stats.get("stages", {}).items())
    drops = (
        "\n".join(f"| {k} | {v} |" for k, v in stats.get("dropped", {}).items()) or "| (none) | 0 |"
    )
    pii = "\n".join(f"| {k} | {v} |" for k, v in stats.get("pii", {}).items()) or "| (none) | 0 |"
    out = stats.get("output", {})
    return (
        f"### Curation: {out.get('total', 0)} records ({out.get('human', 0)} human, {out.get('synthetic', 0)} synthetic)\n\n"
        f"| stage | records after |\n|---|---|\n{stages}\n\n| dropped because | records |\n|---|---|\n{drops}\n\n"
        f"| personal data ({stats.get('pii_policy', 'scrub')}) | findings |\n|---|---|\n{pii}\n"
    )
