"""The state of one rollout: everything a controller needs to continue it after a restart.

A :class:`RolloutState` is stored as JSON (a ConfigMap in the cluster, a file locally). It
holds the target (what moves: a router route or an InferenceService), a snapshot of the
fleet spec's :class:`~lorafleet.fleet.CanaryPolicy` taken at start, the phase, the current
step and weight, the counters of the failure and inconclusive limits, the metrics baseline
of the next analysis, and the last decisions with their measurements.

Phases::

    Progressing --(inconclusive_limit in a row | pause)--> Paused --(resume)--> Progressing
    Progressing --(every step passed | promote)--> Promoted
    Progressing | Paused --(failure_limit failed analyses)--> RolledBack
    Progressing | Paused --(rollback | error_limit)--> Aborted

``Promoted``, ``RolledBack`` and ``Aborted`` are final; the last two send every request to
the stable version again. A rollout started by the pipeline's deploy step also names the
registry versions it decides on (:class:`RegistryHandoff`): the controller that settles it
as ``Promoted`` moves their production pointers, and records what happened.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from lorafleet.fleet import SLUG, CanaryPolicy
from lorafleet.rollout.discovery import ServiceRef, is_service

__all__ = [
    "FINAL",
    "HISTORY_LIMIT",
    "Decision",
    "Measurement",
    "Phase",
    "ProductionMove",
    "RegistryHandoff",
    "RolloutState",
    "Target",
    "Verdict",
]

Phase = Literal["Progressing", "Paused", "Promoted", "RolledBack", "Aborted"]
Verdict = Literal["Successful", "Failed", "Inconclusive", "Error", "Manual"]
FINAL: tuple[Phase, ...] = ("Promoted", "RolledBack", "Aborted")
# Decisions kept in the state: enough to read a whole rollout back, small enough for a ConfigMap.
HISTORY_LIMIT = 50


class Target(BaseModel):
    """What a rollout moves traffic between, and where.

    Attributes:
        mode: ``router`` (adapter weights of one route) or ``revision`` (an
            InferenceService's ``canaryTrafficPercent``).
        stable: the production adapter (router) or revision name (revision; may be empty:
            read from the InferenceService's status).
        canary: the candidate adapter or revision (likewise).
        route: router: the public model name whose weights move.
        router_urls: router: base URLs of the router replicas (admin API and /metrics),
            each one replica or a Kubernetes Service whose ready endpoints are the replicas
            (``k8s://NAMESPACE/SERVICE[:PORT]``, found again on every tick; see
            :mod:`lorafleet.rollout.discovery`).
        sticky_header: router: keep a user on one version while the weights hold.
        token_env: router: the environment variable holding the admin bearer token (the
            token itself is never stored).
        namespace: the Kubernetes namespace (revision mode, and the Prometheus queries).
        isvc: revision: the InferenceService's name.
    """

    mode: Literal["router", "revision"] = "router"
    stable: str = ""
    canary: str = ""
    route: str = ""
    router_urls: list[str] = Field(default_factory=list)
    sticky_header: str | None = None
    token_env: str = "LORAFLEET_ADMIN_TOKEN"
    namespace: str = ""
    isvc: str = ""

    @model_validator(mode="after")
    def _complete(self) -> Target:
        if self.mode == "router":
            missing = [f for f in ("route", "stable", "canary") if not getattr(self, f)]
            if missing or not self.router_urls:
                missing += [] if self.router_urls else ["router_url"]
                raise ValueError(f"a router canary needs {', '.join(missing)}")
            if self.stable == self.canary:
                raise ValueError("stable and canary must be different adapters")
            for url in filter(is_service, self.router_urls):
                ServiceRef.parse(url)
        elif not self.isvc:
            raise ValueError("a revision canary needs the InferenceService's name (isvc)")
        return self


class Measurement(BaseModel):
    """One version's numbers over one analysis interval (``None``: not measurable)."""

    version: str
    requests: float = 0.0
    errors: float | None = None
    error_rate: float | None = None
    p95_latency_ms: float | None = None
    judge_score: float | None = None
    judge_samples: float | None = None


class Decision(BaseModel):
    """One analysis or command, and what it led to."""

    at: float = Field(description="unix time")
    step: int = Field(description="0-based index into the policy's steps")
    weight: int = Field(description="the canary's share (percent) when decided")
    verdict: Verdict
    action: str = Field(
        description="what followed: hold, advance to N%, promote, rollback, pause, ..."
    )
    reasons: list[str] = Field(default_factory=list)
    canary: Measurement | None = None
    stable: Measurement | None = None


class ProductionMove(BaseModel):
    """One expert's registry versions on a canary: production before, and the candidate."""

    expert: str
    previous: str = Field(description="production when the rollout started (the stable side)")
    candidate: str


class RegistryHandoff(BaseModel):
    """The registry production pointers a rollout moves when it is promoted.

    Attributes:
        uri: the registry's location (as the deploy step saw it).
        moves: one per expert on the canary.
        outcome: empty until the rollout is settled; then what became of the pointers:
            moved, left alone (rolled back), or not moved and why (the controller cannot
            reach the registry, production changed meanwhile), with the operator's command.
    """

    uri: str
    moves: list[ProductionMove]
    outcome: str = ""


class RolloutState(BaseModel):
    """A rollout as stored; see the module docstring for the phases."""

    api_version: Literal["lorafleet/rollout-v1"] = "lorafleet/rollout-v1"
    name: str = Field(pattern=SLUG)
    target: Target
    policy: CanaryPolicy
    phase: Phase = "Progressing"
    step: int = 0
    weight: int = 0
    started_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    step_started_at: float = Field(default_factory=time.time)
    last_analysis_at: float | None = None
    baseline: dict[str, Any] | None = Field(
        None, description="router source: counters at the last analysis"
    )
    failures: int = 0
    inconclusive: int = 0
    errors: int = 0
    message: str = ""
    settled: bool = Field(False, description="the final weights are applied (final phases)")
    registry: RegistryHandoff | None = Field(
        None, description="production pointers to move on promotion (pipeline rollouts)"
    )
    history: list[Decision] = Field(default_factory=list)
    revision: int = Field(0, description="bumped on every write: the stores compare-and-swap on it")

    @property
    def final(self) -> bool:
        """Whether the rollout has ended (promoted, rolled back or aborted)."""
        return self.phase in FINAL

    @property
    def steps(self) -> list[int]:
        """The policy's steps (percent of traffic on the canary)."""
        return self.policy.steps

    def record(self, decision: Decision) -> None:
        """Append a decision, keeping the last :data:`HISTORY_LIMIT`."""
        self.history = [*self.history, decision][-HISTORY_LIMIT:]

    def last_analysis(self) -> Decision | None:
        """The latest decision that came from an analysis (not a command)."""
        return next((d for d in reversed(self.history) if d.verdict != "Manual"), None)
