"""The fleet report: self-contained HTML, safe text, a row per expert."""

from __future__ import annotations

import re

from lorafleet.report import (
    gate_line,
    kfp_metrics,
    loss_svg,
    metric_bars_svg,
    readable_reply,
    render_eval_html,
    render_eval_markdown,
    render_html,
    render_markdown,
)


def _expert(passed: bool, reply: str | None) -> dict:
    return {
        "task": "job-analyzer",
        "primary_metric": "json_valid",
        "eval_loss_base": 2.0,
        "eval_loss_candidate": 1.5,
        "metrics_base": {"json_valid": 0.0},
        "metrics_candidate": {"json_valid": 0.5},
        "gate_passed": passed,
        "gate_reasons": [
            "PASS heldout-loss-vs-base: ok" if passed else "FAIL min-json_valid: 0.5 (min 0.9)"
        ],
        "train": {"losses": [3.0, 2.0, 1.0], "steps": 3, "tokens_per_s": 100.0},
        "curation": {"output": {"total": 10, "human": 5, "synthetic": 5}},
        "adapter_uri": "/reg/a/v1" if passed else None,
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
    assert page.count("<svg") == 4  # per expert: the loss curve and the metric bars
    assert "<script" not in page and "<link" not in page and "src=" not in page
    assert "&lt;b&gt;\ufffdbold&lt;/b&gt;" in page  # model output is text, never markup
    assert "gate failed" in page and "FAIL min-json_valid" in page
    assert "12.5 s" in page


def test_markdown_has_a_row_per_expert() -> None:
    rows = [
        ln
        for ln in render_markdown(SUMMARY).splitlines()
        if ln.startswith("| good") or ln.startswith("| blocked")
    ]
    assert rows == [
        "| good | 2.0000 | 1.5000 | json_valid: 0.0 → 0.5 | pass | v1 | yes |",
        "| blocked | 2.0000 | 1.5000 | json_valid: 0.0 → 0.5 | FAIL | - | no |",
    ]


def test_loss_svg_draws_every_point() -> None:
    svg = loss_svg([3.0, 2.0, 1.0])
    assert svg.count(",") >= 3 and "3.000 → 1.000" in svg


EVALUATION = {
    "expert": "ja",
    "eval_loss_candidate": 1.2,
    "eval_loss_base": 2.0,
    "eval_loss_production": 1.3,
    "metrics_candidate": {"json_valid": 0.75, "safety_pass_rate": 1.0},
    "metrics_base": {"json_valid": 0.0, "safety_pass_rate": 0.5},
    "metrics_production": {"json_valid": 0.5},
    "judge": {
        "model": "j",
        "reference": "production",
        "items": 4,
        "win_rate": 0.625,
        "ci_low": 0.5,
        "ci_high": 0.75,
        "confidence": 0.95,
        "outcomes": {"win": 4, "loss": 2, "tie": 1, "unparseable": 1},
    },
    "gate_passed": False,
    "gate_rules": [
        {"rule": "no-regression-json_valid", "passed": False, "value": 0.75, "threshold": 0.8}
    ],
}


def test_metric_bars_draw_one_bar_per_arm_and_metric() -> None:
    svg = metric_bars_svg(
        {
            "json_valid": {"candidate": 0.75, "base": 0.0, "production": None},
            "<x>": {"candidate": 1.0, "base": 0.5, "production": 1.0},
        }
    )
    assert svg.count("<title>") == 6
    assert "<title>candidate 0.750</title>" in svg and "<title>production -</title>" in svg
    assert "&lt;x&gt;" in svg and "<x>" not in svg
    # Bar widths scale with the value: 1.0 is twice 0.5.
    widths = [
        float(w) for w in re.findall(r'<rect x="150" y="[\d.]+" width="([\d.]+)" height="8"', svg)
    ]
    assert len(widths) == 6
    assert widths[3] == 2 * widths[4] > 0 and widths[1] == widths[2] == 0


def test_eval_markdown_shows_rules_arms_and_judge() -> None:
    md = render_eval_markdown(EVALUATION)
    assert md.startswith("## `ja`: gate FAILED")
    assert "| no-regression-json_valid | FAIL | 0.75 | 0.8 |" in md
    assert "| metric | candidate | base | production |" in md
    assert "| held-out loss | 1.2000 | 2.0000 | 1.3000 |" in md
    assert "| safety_pass_rate | 1.000 | 0.500 | - |" in md
    assert (
        "win rate 0.625 (95% CI 0.500-0.750) over 4 items x 2 orders: 4 won, 2 lost, 1 tied, 1 unparseable"
        in md
    )


def test_kfp_metrics_are_flat_numbers() -> None:
    m = kfp_metrics(EVALUATION)
    assert (
        m["candidate_json_valid"] == 0.75
        and m["production_json_valid"] == 0.5
        and m["eval_loss_base"] == 2.0
    )
    assert m["judge_ci_low"] == 0.5 and m["gate_passed"] == 0.0
    assert all(isinstance(v, float) for v in m.values())


def test_eval_html_is_one_offline_page_with_the_bars() -> None:
    page = render_eval_html({**EVALUATION, "expert": "<ja>"})
    assert page.startswith("<!doctype html>") and page.count("<svg") == 1
    assert "<script" not in page and "src=" not in page
    assert "&lt;ja&gt;" in page and "gate failed" in page
    assert (
        "held-out loss: candidate <b>1.2000</b> · base <b>2.0000</b> · production <b>1.3000</b>"
        in page
    )


def test_replies_are_shown_readably_blank_runs_collapsed_and_long_ones_folded() -> None:
    shown, rest = readable_reply("\n\n\n\n\nTitle: x\n\n\n\n\nBudget: $5\n\n\n")
    assert (shown, rest) == ("Title: x\n\nBudget: $5", "")
    assert readable_reply("\n \n\n") == ("(empty reply)", "")
    long = " ".join(f"word{i}" for i in range(200))
    shown, rest = readable_reply(long, fold=100)
    assert len(shown) <= 100 and shown + rest == long and not shown.endswith("wor")
    summary = {
        **SUMMARY,
        "experts": {
            "good": {
                **_expert(True, "\n" * 30 + long),
                "samples_candidate": ["\n\n\n\nA\n\n\n\nB"],
            }
        },
    }
    page = render_html(summary)
    assert "\n" * 3 not in page.split("<body>")[1]
    assert "<details><summary>more</summary>" in page  # the long served reply is folded
    assert "candidate answer 1 (eval set)" in page and "A\n\nB" in page


def test_each_expert_has_one_line_saying_why_its_gate_decided() -> None:
    good = {**_expert(True, None), "gate_rules": [{"rule": "r", "passed": True, "message": "m"}]}
    assert gate_line(good) == (
        "passed: json_valid improved from base 0.000 to 0.500 (+0.500); all 1 gate rules held"
    )
    bad = {
        **_expert(False, None),
        "metrics_candidate": {"json_valid": 0.0},
        "gate_rules": [
            {"rule": "min-json_valid", "passed": False, "message": "json_valid 0.000 (min 0.9)"},
            {"rule": "heldout-loss-vs-base", "passed": True, "message": "ok"},
        ],
    }
    assert gate_line(bad) == (
        "failed: json_valid 0.000 (min 0.9); json_valid unchanged from base 0.000 to 0.000 (+0.000)"
    )
    lower = {**good, "primary_direction": "lower"}
    assert "worsened" in gate_line(lower)
    assert "- **good**: gate passed: json_valid improved" in render_markdown(SUMMARY)
    assert "gate failed: " in render_html(SUMMARY)
