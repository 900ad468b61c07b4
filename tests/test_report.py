"""The fleet report: self-contained HTML, safe text, a row per expert."""

from __future__ import annotations

from lorafleet.report import loss_svg, render_html, render_markdown


def _expert(passed: bool, reply: str | None) -> dict:
    return {
        "task": "job-analyzer",
        "primary_metric": "json_valid",
        "eval_loss_base": 2.0,
        "eval_loss_candidate": 1.5,
        "metrics_base": {"json_valid": 0.0},
        "metrics_candidate": {"json_valid": 0.5},
        "gate_passed": passed,
        "gate_reasons": ["PASS heldout-loss-vs-base: ok" if passed else "FAIL min-json_valid: 0.5 (min 0.9)"],
        "train": {"losses": [3.0, 2.0, 1.0], "steps": 3, "tokens_per_s": 100.0},
        "curation": {"output": {"total": 10, "human": 5, "synthetic": 5}},
        "adapter_path": "/reg/a/v1" if passed else None,
        "adapter_version": "v1" if passed else None,
        "served": passed,
        "reply": {"status": 200, "text": reply} if reply is not None else None,
    }


SUMMARY = {
    "fleet": "f",
    "base": "demo",
    "wall_time_s": 12.5,
    "experts": {"good": _expert(True, "<b>\x00bold</b>"), "blocked": _expert(False, None)},
}


def test_html_is_self_contained_and_escaped() -> None:
    page = render_html(SUMMARY)
    assert page.count("<svg") == 2
    assert "<script" not in page and "<link" not in page and "src=" not in page
    assert "&lt;b&gt;\ufffdbold&lt;/b&gt;" in page  # model output is text, never markup
    assert "gate failed" in page and "FAIL min-json_valid" in page
    assert "12.5 s" in page


def test_markdown_has_a_row_per_expert() -> None:
    rows = [ln for ln in render_markdown(SUMMARY).splitlines() if ln.startswith("| good") or ln.startswith("| blocked")]
    assert rows == [
        "| good | 2.0000 | 1.5000 | json_valid: 0.0 → 0.5 | pass | v1 | yes |",
        "| blocked | 2.0000 | 1.5000 | json_valid: 0.0 → 0.5 | FAIL | - | no |",
    ]


def test_loss_svg_draws_every_point() -> None:
    svg = loss_svg([3.0, 2.0, 1.0])
    assert svg.count(",") >= 3 and "3.000 → 1.000" in svg
