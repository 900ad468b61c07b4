"""The gate decides from the spec's thresholds and says why."""

from __future__ import annotations

from lorafleet.evaluate.judge import aggregate
from lorafleet.fleet import GateJudge, GatePolicy
from lorafleet.gate import decide


def test_better_candidate_passes_with_reasons() -> None:
    d = decide(
        GatePolicy(max_loss_ratio=0.95, min_metrics={"json_valid": 0.5}),
        2.0,
        1.5,
        {"json_valid": 0.75},
    )
    assert d.passed
    assert d.reasons == [
        "PASS heldout-loss-vs-base: candidate loss 1.5000 is 0.750x base 2.0000 (max 0.95x)",
        "PASS min-json_valid: json_valid 0.750 (min 0.5)",
    ]


def test_worse_loss_or_missing_metric_fails() -> None:
    d = decide(GatePolicy(max_loss_ratio=0.95, min_metrics={"skills_f1": 0.2}), 2.0, 1.96, {})
    assert not d.passed
    assert [r.passed for r in d.rules] == [False, False]
    assert d.to_dict()["reasons"][1] == "FAIL min-skills_f1: skills_f1 missing (min 0.2)"


def test_candidate_must_not_regress_against_production() -> None:
    policy = GatePolicy(max_loss_ratio=0.95, max_loss_regression=0.01, max_metric_regression=0.05)
    production = {"version": "v3", "eval_loss": 1.40, "metrics": {"json_valid": 0.9}}
    worse = decide(policy, 2.0, 1.50, {"json_valid": 0.80}, production)
    assert not worse.passed
    assert [r.rule for r in worse.rules if not r.passed] == [
        "heldout-loss-vs-production",
        "no-regression-json_valid",
    ]
    assert "vs production v3 1.4000" in worse.reasons[1]
    # Within the margins (loss +0.7%, metric -0.03) the candidate may replace production.
    same = decide(policy, 2.0, 1.41, {"json_valid": 0.87}, production)
    assert same.passed


def _judged(win_rate: float, low: float, high: float) -> dict:
    return {
        "items": 16,
        "win_rate": win_rate,
        "ci_low": low,
        "ci_high": high,
        "confidence": 0.95,
        "reference": "production",
        "outcomes": {"win": 20, "loss": 8, "tie": 2, "unparseable": 2},
        "parse_rate": 30 / 32,
    }


def test_judge_rule_gates_on_the_lower_confidence_bound() -> None:
    policy = GatePolicy(
        max_loss_ratio=0.95,
        judge=GateJudge(base_url="http://judge/v1", model="j", min_win_rate_lower_bound=0.5),
    )
    # A win rate above the bar whose interval reaches below it is not enough.
    unsure = decide(policy, 2.0, 1.5, {}, judge=_judged(0.6, 0.45, 0.75))
    assert not unsure.passed
    rule = unsure.rules[-1]
    assert (rule.rule, rule.value, rule.threshold) == ("judge-win-rate-lower-bound", 0.45, 0.5)
    assert (
        "win rate vs production 0.600 (95% CI 0.450-0.750" in rule.message
        and "2 unparseable not scored" in rule.message
    )
    assert decide(policy, 2.0, 1.5, {}, judge=_judged(0.7, 0.55, 0.85)).passed


def test_a_judge_whose_verdicts_mostly_do_not_parse_fails_the_gate() -> None:
    # Given a win rate over the bar from the few verdicts that parsed (4 of 32)
    policy = GatePolicy(
        max_loss_ratio=0.95,
        judge=GateJudge(base_url="http://judge/v1", model="j", min_parse_rate=0.9),
    )
    judged = {
        **_judged(1.0, 1.0, 1.0),
        "outcomes": {"win": 4, "loss": 0, "tie": 0, "unparseable": 28},
        "parse_rate": 4 / 32,
    }
    # When gated, Then the parse-rate rule fails it, whatever the win rate says
    decision = decide(policy, 2.0, 1.5, {}, judge=judged)
    assert not decision.passed
    rule = next(r for r in decision.rules if r.rule == "judge-parse-rate")
    assert (rule.passed, rule.value, rule.threshold) == (False, 0.125, 0.9)
    assert "28 of 32 verdicts unparseable" in rule.message
    # and a judge with no verdicts at all fails both judge rules
    none = decide(policy, 2.0, 1.5, {}, judge=aggregate([("unparseable", "unparseable")] * 16))
    assert [r.passed for r in none.rules if r.rule.startswith("judge")] == [False, False]


def test_judge_rule_fails_without_verdicts_and_is_absent_without_a_judge() -> None:
    policy = GatePolicy(max_loss_ratio=0.95, judge=GateJudge(base_url="http://judge/v1", model="j"))
    missing = decide(policy, 2.0, 1.5, {})
    assert not missing.passed and missing.reasons[-1].startswith(
        "FAIL judge-win-rate-lower-bound: no judge verdicts"
    )
    assert [
        r.rule
        for r in decide(
            GatePolicy(max_loss_ratio=0.95), 2.0, 1.5, {}, judge=_judged(0.1, 0.0, 0.2)
        ).rules
    ] == ["heldout-loss-vs-base"]
