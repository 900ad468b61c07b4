"""How a rollout reads: one block of text for people, one JSON object for scripts."""

from __future__ import annotations

import time
from typing import Any

from lorafleet.rollout.state import Decision, Measurement, RolloutState

__all__ = ["status_json", "status_text"]


def _where(state: RolloutState) -> str:
    t = state.target
    if t.mode == "router":
        return f"route {t.route} on {', '.join(t.router_urls)}"
    return f"InferenceService {t.namespace}/{t.isvc} (canaryTrafficPercent)"


def _source(state: RolloutState) -> str:
    a = state.policy.analysis
    where = (
        f"Prometheus {a.prometheus_url}" if a.source == "prometheus" else "the router's /metrics"
    )
    return f"every {a.interval_seconds:g}s from {where}; {state.policy.pause_seconds}s at least per step"


def _ago(at: float | None, now: float) -> str:
    return "never" if at is None else f"{max(0.0, now - at):.1f}s ago"


def status_json(state: RolloutState, now: float | None = None) -> dict[str, Any]:
    """The rollout as plain data: what ``-o json`` prints.

    Args:
        state: the stored rollout.
        now: the time to measure ages against (default: now).
    """
    now = time.time() if now is None else now
    t = state.target
    last = state.last_analysis()
    decided = next(
        (d for d in reversed(state.history) if d.action in ("promote", "rollback", "abort")), None
    )
    return {
        "name": state.name,
        "phase": state.phase,
        "mode": t.mode,
        "target": t.model_dump(),
        "steps": state.steps,
        "step": state.step,
        "weight": state.weight,
        "weights": {t.stable or "stable": 100 - state.weight, t.canary or "canary": state.weight},
        "failures": {"count": state.failures, "limit": state.policy.failure_limit},
        "inconclusive": {"count": state.inconclusive, "limit": state.policy.inconclusive_limit},
        "errors": {"count": state.errors, "limit": state.policy.analysis.error_limit},
        "message": state.message,
        "settled": state.settled,
        "started_at": state.started_at,
        "updated_at": state.updated_at,
        "age_s": round(now - state.started_at, 3),
        "time_to_decision_s": round(decided.at - state.started_at, 3) if decided else None,
        "last_analysis": last.model_dump() if last else None,
        "history": [d.model_dump() for d in state.history],
        "policy": state.policy.model_dump(),
        "revision": state.revision,
        "registry": state.registry.model_dump() if state.registry else None,
    }


def _row(label: str, m: Measurement | None) -> str:
    if m is None:
        return f"  {label:<7} -"

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    return (
        f"  {label:<7} {m.version:<24} {m.requests:>8g} {num(m.errors, 'g'):>6} {num(m.error_rate, '.2%'):>10} "
        f"{num(m.p95_latency_ms, 'g'):>8} {num(m.judge_score, '.2f'):>6}"
    )


def _steps(state: RolloutState) -> str:
    marks = []
    for i, weight in enumerate(state.steps):
        if state.phase in ("RolledBack", "Aborted") and i == state.step:
            mark = "x"
        elif i < state.step or state.phase == "Promoted":
            mark = "done"
        elif i == state.step:
            mark = "now"
        else:
            mark = ""
        marks.append(f"{weight}%" + (f" ({mark})" if mark else ""))
    return " -> ".join(marks)


def _decision_line(d: Decision, started: float) -> str:
    why = "; ".join(d.reasons)
    return f"  +{d.at - started:7.1f}s  {d.weight:>3}%  {d.verdict:<12} {d.action:<16} {why}"


def status_text(state: RolloutState, now: float | None = None, history: int = 5) -> str:
    """The rollout at a glance: phase, weights, steps, last measurements and decision.

    Args:
        state: the stored rollout.
        now: the time to measure ages against (default: now).
        history: how many of the latest decisions to list (0: none).
    """
    now = time.time() if now is None else now
    t = state.target
    p = state.policy
    stable, canary = t.stable or "stable", t.canary or "canary"
    lines = [
        f"Rollout:     {state.name}   ({t.mode} canary, {_where(state)})",
        f"Phase:       {state.phase}" + (f"   {state.message}" if state.message else ""),
        f"Weights:     {stable} {100 - state.weight}%  |  {canary} {state.weight}% (canary)"
        + ("" if state.settled or not state.final else "   [applying]"),
        f"Steps:       {_steps(state)}",
        f"Analysis:    {_source(state)}",
        f"Thresholds:  error rate <= {p.max_error_rate:.1%}, p95 <= {p.max_p95_latency_ms:g} ms"
        + (f", judge >= {p.analysis.judge.min_score:g}" if p.analysis.judge else "")
        + f", >= {p.analysis.min_requests} canary requests per analysis",
        f"Limits:      failures {state.failures}/{p.failure_limit}, inconclusive {state.inconclusive}/"
        f"{p.inconclusive_limit} in a row, errors {state.errors}/{p.analysis.error_limit} in a row",
    ]
    if state.registry is not None:
        moves = ", ".join(f"{m.expert} {m.previous} -> {m.candidate}" for m in state.registry.moves)
        lines.append(
            f"Registry:    {state.registry.uri}: {moves}; "
            + (state.registry.outcome or "production moves when the rollout is promoted")
        )
    last = state.last_analysis()
    if last is None:
        lines.append("Last:        no analysis yet")
    else:
        lines.append(
            f"Last:        {last.verdict}, {_ago(last.at, now)}, at {last.weight}%: {last.action}"
        )
        if last.reasons:
            lines.append(f"             {'; '.join(last.reasons)}")
        lines.append(
            f"  {'':<7} {'version':<24} {'requests':>8} {'errors':>6} {'error rate':>10} {'p95 ms':>8} {'judge':>6}"
        )
        lines += [_row("stable", last.stable), _row("canary", last.canary)]
    if history and state.history:
        lines.append(
            f"History:     (last {min(history, len(state.history))} of {len(state.history)})"
        )
        lines += [_decision_line(d, state.started_at) for d in state.history[-history:]]
    return "\n".join(lines)
