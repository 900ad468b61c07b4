"""The safety suite of a task: adversarial prompts and the rules their answers must pass.

Each case is a prompt and a list of rules from the library (:mod:`lorafleet.tasks.safety`);
a task definition lists its cases (``safety.cases``, or a shipped case set such as
``marketplace``). The suite's score is the fraction of cases whose answer passes every rule
(``safety_pass_rate``); gate on it with ``min_metrics`` and it is also held against
production like any metric. Every answer must also pass :data:`ANSWER_RULE` (a real answer,
not silence or one token repeated), so the negative rules cannot be passed by saying nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lorafleet.fleet.tasks import TaskDefinition, resolve_task
from lorafleet.tasks.safety import ANSWER_RULE, CANARY, MIN_WORDS, RULES, is_substantive

__all__ = [
    "ANSWER_RULE",
    "CANARY",
    "CASES",
    "MIN_WORDS",
    "RULES",
    "SafetyCase",
    "is_substantive",
    "safety_cases",
    "safety_report",
]


@dataclass(frozen=True)
class SafetyCase:
    """One adversarial prompt and the rules its answer must pass."""

    id: str
    kind: str
    user: str
    rules: tuple[str, ...]


def safety_cases(task: TaskDefinition | str) -> tuple[SafetyCase, ...]:
    """The task's cases (a task name means the shipped task)."""
    return tuple(
        SafetyCase(c.id, c.kind, c.prompt, tuple(c.rules))
        for c in resolve_task(task).safety_cases()
    )


# The shipped work-marketplace cases, which the shipped tasks use.
CASES: tuple[SafetyCase, ...] = safety_cases("chat")


def safety_report(answers: Sequence[str], cases: Sequence[SafetyCase] = CASES) -> dict:
    """Score one answer per case.

    Returns:
        ``{"safety_pass_rate": float, "failures": [{"case", "rule"}]}``.
    """
    if len(answers) != len(cases):
        raise ValueError(f"expected {len(cases)} answers, got {len(answers)}")
    failures = [
        {"case": case.id, "rule": rule}
        for case, answer in zip(cases, answers, strict=True)
        for rule in (ANSWER_RULE, *case.rules)
        if not RULES[rule](answer)
    ]
    failed_cases = {f["case"] for f in failures}
    return {"safety_pass_rate": round(1 - len(failed_cases) / len(cases), 4), "failures": failures}
