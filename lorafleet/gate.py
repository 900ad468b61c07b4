"""The gate: declarative rules that decide whether a candidate adapter may be registered."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, field

from lorafleet.fleet import GatePolicy

__all__ = ["GateDecision", "RuleResult", "decide"]


@dataclass(frozen=True)
class RuleResult:
    """One rule's verdict with the numbers it used."""

    rule: str
    passed: bool
    value: float | None
    threshold: float
    message: str


@dataclass
class GateDecision:
    """All rules and the overall verdict (every rule must pass)."""

    rules: list[RuleResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.rules) and all(r.passed for r in self.rules)

    @property
    def reasons(self) -> list[str]:
        return [f"{'PASS' if r.passed else 'FAIL'} {r.rule}: {r.message}" for r in self.rules]

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "reasons": self.reasons,
            "rules": [asdict(r) for r in self.rules],
        }


def decide(
    policy: GatePolicy,
    eval_loss_base: float,
    eval_loss_candidate: float,
    metrics: dict[str, float],
    production: dict | None = None,
    judge: dict | None = None,
    lower_is_better: Collection[str] = (),
) -> GateDecision:
    """Apply the expert's gate policy to its evaluation.

    Args:
        policy: thresholds from the fleet spec.
        eval_loss_base: held-out loss of the base model.
        eval_loss_candidate: held-out loss of the candidate adapter.
        metrics: the candidate's task metrics.
        production: the production adapter's ``{"version", "eval_loss", "metrics"}`` on the
            same eval set, when one is registered; the candidate must not regress on it.
        judge: the pairwise judge's result (:func:`lorafleet.evaluate.judge.aggregate` plus
            ``"reference"``, the arm judged against); required when the policy sets ``judge``.
        lower_is_better: task metrics whose direction is ``lower`` (the regression rule
            then refuses a rise); every other metric is better higher.

    Returns:
        The decision with one reason per rule.
    """
    decision = GateDecision()
    ratio = eval_loss_candidate / eval_loss_base if eval_loss_base > 0 else float("inf")
    decision.rules.append(
        RuleResult(
            rule="heldout-loss-vs-base",
            passed=ratio <= policy.max_loss_ratio,
            value=round(ratio, 4),
            threshold=policy.max_loss_ratio,
            message=f"candidate loss {eval_loss_candidate:.4f} is {ratio:.3f}x base {eval_loss_base:.4f} (max {policy.max_loss_ratio}x)",
        )
    )
    for name, floor in sorted(policy.min_metrics.items()):
        value = metrics.get(name)
        ok = value is not None and value >= floor
        shown = "missing" if value is None else f"{value:.3f}"
        decision.rules.append(
            RuleResult(
                rule=f"min-{name}",
                passed=ok,
                value=value,
                threshold=floor,
                message=f"{name} {shown} (min {floor})",
            )
        )
    if policy.judge is not None:
        decision.rules.append(_judge_parse_rule(policy.judge.min_parse_rate, judge))
        decision.rules.append(_judge_rule(policy.judge.min_win_rate_lower_bound, judge))
    if production is None:
        return decision
    version, prod_loss = production["version"], production["eval_loss"]
    limit = prod_loss * (1 + policy.max_loss_regression)
    decision.rules.append(
        RuleResult(
            rule="heldout-loss-vs-production",
            passed=eval_loss_candidate <= limit,
            value=round(eval_loss_candidate, 5),
            threshold=round(limit, 5),
            message=f"candidate loss {eval_loss_candidate:.4f} vs production {version} {prod_loss:.4f} "
            f"(max +{policy.max_loss_regression:.0%})",
        )
    )
    for name, prod_value in sorted(production["metrics"].items()):
        value = metrics.get(name)
        lower = name in lower_is_better
        bound = prod_value + (1 if lower else -1) * policy.max_metric_regression
        ok = value is not None and (value <= bound if lower else value >= bound)
        shown = "missing" if value is None else f"{value:.3f}"
        worse = "rise" if lower else "drop"
        decision.rules.append(
            RuleResult(
                rule=f"no-regression-{name}",
                passed=ok,
                value=value,
                threshold=round(bound, 4),
                message=f"{name} {shown} vs production {version} {prod_value:.3f} (max {worse} {policy.max_metric_regression})",
            )
        )
    return decision


def _judge_parse_rule(floor: float, judge: dict | None) -> RuleResult:
    """Enough of the judge's verdicts must parse: a judge that mostly answers something else
    is not judging, whatever the few verdicts it gave say."""
    rate = (judge or {}).get("parse_rate")
    outcomes = (judge or {}).get("outcomes", {})
    return RuleResult(
        rule="judge-parse-rate",
        passed=rate is not None and rate >= floor,
        value=rate,
        threshold=floor,
        message=f"{outcomes.get('unparseable', 0)} of {2 * (judge or {}).get('items', 0)} "
        f"verdicts unparseable (parse rate {rate if rate is not None else 'n/a'}, min {floor})",
    )


def _judge_rule(floor: float, judge: dict | None) -> RuleResult:
    """The candidate's judged win rate, on its lower confidence bound, must reach ``floor``."""
    if not judge or judge.get("ci_low") is None:
        return RuleResult(
            "judge-win-rate-lower-bound",
            False,
            None,
            floor,
            f"no judge verdicts (min lower bound {floor})",
        )
    low = judge["ci_low"]
    outcomes = judge["outcomes"]
    return RuleResult(
        rule="judge-win-rate-lower-bound",
        passed=low >= floor,
        value=low,
        threshold=floor,
        message=f"win rate vs {judge.get('reference', 'reference')} {judge['win_rate']:.3f} "
        f"({judge['confidence']:.0%} CI {low:.3f}-{judge['ci_high']:.3f}, {judge['items']} items x 2 orders; "
        f"{outcomes['win']} won, {outcomes['loss']} lost, {outcomes['tie']} tied, "
        f"{outcomes['unparseable']} unparseable not scored) (min lower bound {floor})",
    )
