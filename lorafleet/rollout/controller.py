"""The rollout controller: one stateless reconcile step, the commands, and the loops around them.

Every call reads the rollout from its store, decides, writes the new state
(compare-and-swap), and only then moves the weights; a crash between the write and the
weight change is healed on the next tick, because each tick first re-applies the stored
weight. Nothing is kept in the :class:`Controller` object between calls, so a controller
killed mid-rollout and started again continues at the same step.

Each analysis (every ``analysis.interval_seconds``) measures both versions and judges the
canary (:func:`judge`):

- **Successful**: every threshold holds. When the step's ``pause_seconds`` are over, the
  rollout moves to the next step; reaching 100% promotes it.
- **Failed**: a threshold is broken. The ``failure_limit``-th failed analysis rolls back
  (all traffic to the stable version, phase ``RolledBack``).
- **Inconclusive**: too few canary requests (``min_requests``) or judge samples, or a
  metric without data. ``inconclusive_limit`` of them in a row pause the rollout until
  someone resumes, promotes or rolls it back.
- **Error**: the metrics could not be read. ``error_limit`` in a row abort the rollout
  (traffic back to the stable version, phase ``Aborted``).

A revision canary that KServe created but has not made ready yet is not analysed: the
step's clock starts once it serves.

Commands (:meth:`Controller.promote`, ``rollback``, ``pause``, ``resume``, ``start``) are
idempotent: repeating one changes nothing and answers the same state.

A rollout that names registry versions (:class:`~lorafleet.rollout.state.RegistryHandoff`,
set by the pipeline's deploy step) moves their production pointers when it settles as
``Promoted``, each only if production is still the version the canary started from; a
rolled-back or aborted rollout leaves production alone. What happened is written into the
state; where this controller cannot write the registry, the state says so and names the
``lorafleet registry promote`` command that finishes the job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorafleet.errors import LorafleetError
from lorafleet.fleet import CanaryPolicy
from lorafleet.registry import Registry
from lorafleet.rollout.actuators import Actuator, RevisionActuator, RouterActuator
from lorafleet.rollout.discovery import is_service, resolve_urls
from lorafleet.rollout.sources import PrometheusSource, RouterSource
from lorafleet.rollout.state import (
    Decision,
    Measurement,
    RegistryHandoff,
    RolloutState,
    Target,
    Verdict,
)
from lorafleet.rollout.store import Conflict, NotFound, StateStore

__all__ = ["Controller", "judge", "run_controller"]

log = logging.getLogger(__name__)

# Compare-and-swap retries before a command gives up (someone else keeps writing).
_RETRIES = 8


def judge(canary: Measurement, policy: CanaryPolicy) -> tuple[Verdict, list[str]]:
    """The verdict on one interval's canary measurement, and why.

    Args:
        canary: the candidate's numbers over the interval.
        policy: thresholds and minimum sample sizes.

    Returns:
        ``Failed`` when any threshold is broken (failures win over missing data),
        ``Inconclusive`` when there is too little data, else ``Successful``; and one
        reason per check.
    """
    analysis = policy.analysis
    if canary.requests < analysis.min_requests:
        return "Inconclusive", [
            f"{canary.requests:g} canary requests < min_requests {analysis.min_requests}"
        ]
    failed, unknown, passed = [], [], []
    if canary.error_rate is None:
        unknown.append("no error rate")
    elif canary.error_rate > policy.max_error_rate:
        failed.append(f"error rate {canary.error_rate:.1%} > max {policy.max_error_rate:.1%}")
    else:
        passed.append(f"error rate {canary.error_rate:.1%} <= {policy.max_error_rate:.1%}")
    if canary.p95_latency_ms is None:
        unknown.append("no p95 latency")
    elif canary.p95_latency_ms > policy.max_p95_latency_ms:
        failed.append(f"p95 {canary.p95_latency_ms:g} ms > max {policy.max_p95_latency_ms:g} ms")
    else:
        passed.append(f"p95 {canary.p95_latency_ms:g} ms <= {policy.max_p95_latency_ms:g} ms")
    if analysis.judge is not None:
        spec = analysis.judge
        if canary.judge_score is None or (
            canary.judge_samples is not None and canary.judge_samples < spec.min_samples
        ):
            unknown.append(
                f"judge: {canary.judge_samples or 0:g} scored answers < min_samples {spec.min_samples}"
            )
        elif canary.judge_score < spec.min_score:
            failed.append(f"judge score {canary.judge_score:.2f} < min {spec.min_score:g}")
        else:
            passed.append(f"judge score {canary.judge_score:.2f} >= {spec.min_score:g}")
    if failed:
        return "Failed", failed + passed
    if unknown:
        return "Inconclusive", unknown + passed
    return "Successful", passed


class Controller:
    """Reconcile and command rollouts kept in a store.

    Args:
        store: where the states live (:class:`~lorafleet.rollout.store.ConfigMapStore` or
            :class:`~lorafleet.rollout.store.FileStore`).
        api: a ``kubernetes.client.ApiClient`` (revision mode, router Services); ``None``
            where none is needed.
        clock: seconds since the epoch (tests pass their own).
        connect: makes the ``ApiClient`` the first time one is needed, where ``api`` is
            ``None`` (a local run that reads a kubeconfig only for a rollout that needs it).
        open_registry: opens a registry by URI, to move production pointers on promotion
            (default: :class:`~lorafleet.registry.Registry` on the environment's storage
            settings).
    """

    def __init__(
        self,
        store: StateStore,
        api=None,
        clock: Callable[[], float] = time.time,
        connect: Callable[[], Any] | None = None,
        open_registry: Callable[[str], Registry] = Registry,
    ) -> None:
        self.store = store
        self.api = api
        self.clock = clock
        self.connect = connect
        self.open_registry = open_registry

    # -- wiring -------------------------------------------------------------------------------

    def kube(self, why: str):
        """The ``ApiClient`` (made by ``connect`` on first use).

        Raises:
            LorafleetError: if there is none, saying ``why`` one was needed.
        """
        if self.api is None and self.connect is not None:
            self.api = self.connect()
        if self.api is None:
            raise LorafleetError(f"{why} needs a Kubernetes API (kubeconfig)")
        return self.api

    def replicas(self, state: RolloutState) -> Target:
        """The router target as this tick sees it: each ``k8s://`` Service replaced by the
        URLs of its ready endpoints (:func:`~lorafleet.rollout.discovery.resolve_urls`).

        Raises:
            LorafleetError: if a named Service has no ready endpoint, or there is no API.
        """
        urls = state.target.router_urls
        if not any(map(is_service, urls)):
            return state.target
        api = self.kube(
            f"rollout {state.name!r}: a router Service ({', '.join(filter(is_service, urls))})"
        )
        return state.target.model_copy(update={"router_urls": resolve_urls(urls, api)})

    def actuator(self, state: RolloutState) -> Actuator:
        """The actuator of a rollout's target, on this tick's router replicas."""
        if state.target.mode == "router":
            return RouterActuator(self.replicas(state))
        api = self.kube(f"rollout {state.name!r}: a revision canary")
        return RevisionActuator(api, state.target)

    @staticmethod
    def source(state: RolloutState) -> RouterSource | PrometheusSource:
        """The metrics source of a rollout's policy."""
        if state.policy.analysis.source == "prometheus":
            return PrometheusSource(state.policy)
        return RouterSource(state.policy)

    def _update(
        self, name: str, change: Callable[[RolloutState], RolloutState | None]
    ) -> tuple[RolloutState, bool]:
        """Read, change, compare-and-swap; ``change`` returning ``None`` means "nothing to do"."""
        for _ in range(_RETRIES):
            state = self.store.load(name)
            new = change(state.model_copy(deep=True))
            if new is None:
                return state, False
            new.updated_at = self.clock()
            try:
                return self.store.save(new), True
            except Conflict:
                continue
        raise LorafleetError(
            f"rollout {name!r}: the state kept changing while it was written; try again"
        )

    def _decision(
        self,
        state: RolloutState,
        verdict: Verdict,
        action: str,
        reasons: list[str] | None = None,
        stable: Measurement | None = None,
        canary: Measurement | None = None,
    ) -> Decision:
        return Decision(
            at=self.clock(),
            step=state.step,
            weight=state.weight,
            verdict=verdict,
            action=action,
            reasons=reasons or [],
            stable=stable,
            canary=canary,
        )

    # -- commands -----------------------------------------------------------------------------

    def _rival(self, name: str, target: Target) -> RolloutState | None:
        """Another running rollout that moves what ``target`` moves, if any."""
        for other in self.store.names():
            if other == name:
                continue
            try:
                state = self.store.load(other)
            except NotFound:  # finished and deleted meanwhile
                continue
            if not state.final and _moved(state.target) == _moved(target):
                return state
        return None

    def start(
        self,
        name: str,
        target: Target,
        policy: CanaryPolicy,
        registry: RegistryHandoff | None = None,
    ) -> RolloutState:
        """Start a rollout at the policy's first step; repeating the same start is a no-op.

        Args:
            name: the rollout's name.
            target: what moves.
            policy: steps and thresholds (a snapshot is stored).
            registry: production pointers to move when the rollout is promoted.

        A start is all or nothing: if the first weight cannot be applied (a router replica
        unreachable, the canary not loaded), the rollout is forgotten again (or the finished
        one it replaced put back) and the error raised, so the corrected start is accepted.

        Raises:
            LorafleetError: if a rollout of that name is still running with another target,
                if another running rollout moves the same route (or InferenceService), or
                if the first weight cannot be applied.
        """
        try:
            existing = self.store.load(name)
        except NotFound:
            existing = None
        if existing is not None and not existing.final:
            if existing.target == target and existing.policy == policy:
                return existing
            raise LorafleetError(
                f"rollout {name!r} is {existing.phase} with another target or policy; promote or roll it back first"
            )
        rival = self._rival(name, target)
        if rival is not None:
            raise LorafleetError(
                f"rollout {rival.name!r} is {rival.phase} on the same {_moved(target)}; two "
                "rollouts would fight over its weights: promote, roll back or abort it first"
            )
        now = self.clock()
        state = RolloutState(
            name=name,
            target=target,
            policy=policy,
            weight=policy.steps[0],
            started_at=now,
            updated_at=now,
            step_started_at=now,
            registry=registry,
        )
        if state.weight >= 100:
            state.phase = "Promoted"
        state.record(self._decision(state, "Manual", f"start at {state.weight}%"))
        actuator = self.actuator(state)  # checks the token / API before anything is stored
        try:
            state = self.store.create(state, replace=existing is not None)
        except Conflict:  # a concurrent start of the same name won the race
            return self.start(name, target, policy, registry)
        try:
            actuator.apply(state.weight)
        except Exception:
            if existing is not None:
                self.store.create(existing, replace=True)
            else:
                self.store.delete(name)
            raise
        if state.final:
            return self._settle(name, actuator)
        source = self.source(state)
        if source.needs_baseline:
            try:
                baseline = source.snapshot(actuator.target, actuator.versions())
            except LorafleetError as exc:  # the first tick takes it
                log.warning("rollout %s: no baseline at start: %s", name, exc)
            else:
                state, _ = self._update(
                    name, lambda s: _updated(s, baseline=baseline, last_analysis_at=now)
                )
        return state

    def promote(self, name: str) -> RolloutState:
        """Send all traffic to the canary now (phase ``Promoted``); a no-op when promoted.

        Raises:
            LorafleetError: if the rollout was rolled back or aborted.
        """

        def change(state: RolloutState) -> RolloutState | None:
            if state.phase == "Promoted":
                return None
            if state.final:
                raise LorafleetError(
                    f"rollout {name!r} is {state.phase}; start a new rollout to try the canary again"
                )
            state.phase, state.step, state.weight, state.settled = (
                "Promoted",
                len(state.steps) - 1,
                100,
                False,
            )
            state.message = "promoted by an operator"
            state.record(self._decision(state, "Manual", "promote"))
            return state

        self._update(name, change)
        return self._settle(name)

    def rollback(self, name: str, reason: str = "rolled back by an operator") -> RolloutState:
        """Send all traffic to the stable version now (phase ``Aborted``); a no-op when
        already rolled back or aborted.

        Raises:
            LorafleetError: if the rollout was promoted (start a new one to go back).
        """

        def change(state: RolloutState) -> RolloutState | None:
            if state.phase in ("RolledBack", "Aborted"):
                return None
            if state.phase == "Promoted":
                raise LorafleetError(
                    f"rollout {name!r} is Promoted: the canary is production now; start a rollout back to "
                    f"{state.target.stable or 'the previous version'} instead"
                )
            state.phase, state.weight, state.settled, state.message = "Aborted", 0, False, reason
            state.record(self._decision(state, "Manual", "rollback", [reason]))
            return state

        self._update(name, change)
        return self._settle(name)

    def pause(self, name: str) -> RolloutState:
        """Hold the current weight and stop analysing until :meth:`resume`; a no-op when paused.

        Raises:
            LorafleetError: if the rollout has ended.
        """

        def change(state: RolloutState) -> RolloutState | None:
            if state.phase == "Paused":
                return None
            if state.final:
                raise LorafleetError(
                    f"rollout {name!r} has ended ({state.phase}): nothing to pause"
                )
            state.phase, state.message = "Paused", "paused by an operator"
            state.record(self._decision(state, "Manual", "pause"))
            return state

        return self._update(name, change)[0]

    def resume(self, name: str) -> RolloutState:
        """Continue a paused rollout at its step (the inconclusive count starts again); a
        no-op when progressing.

        Raises:
            LorafleetError: if the rollout has ended.
        """

        def change(state: RolloutState) -> RolloutState | None:
            if state.phase == "Progressing":
                return None
            if state.final:
                raise LorafleetError(
                    f"rollout {name!r} has ended ({state.phase}): nothing to resume"
                )
            state.phase, state.inconclusive, state.errors, state.message = (
                "Progressing",
                0,
                0,
                "resumed by an operator",
            )
            state.record(self._decision(state, "Manual", "resume"))
            return state

        return self._update(name, change)[0]

    def _settle(self, name: str, actuator: Actuator | None = None) -> RolloutState:
        """Apply a final state's weight once, hand the outcome to the registry, and mark
        it settled."""
        state = self.store.load(name)
        if not state.final or state.settled:
            return state
        (actuator or self.actuator(state)).apply(state.weight)
        handoff = self._hand_over(state)
        revision = state.revision
        settled, _ = self._update(
            name,
            lambda s: (
                _updated(s, settled=True, registry=handoff) if s.revision == revision else None
            ),
        )
        return settled

    def _hand_over(self, state: RolloutState) -> RegistryHandoff | None:
        """Move the production pointers of a promoted rollout (each only from the version
        the canary started from); leave them after a rollback. Never raises: what could not
        be done is the outcome, with the command that does it."""
        handoff = state.registry
        if handoff is None or handoff.outcome:
            return handoff
        if state.phase != "Promoted":
            kept = ", ".join(f"{m.expert} {m.previous}" for m in handoff.moves)
            return handoff.model_copy(
                update={"outcome": f"production unchanged ({state.phase}): {kept}"}
            )
        done = []
        for move in handoff.moves:
            try:
                self.open_registry(handoff.uri).set_production(
                    move.expert, move.candidate, expected=move.previous
                )
                done.append(f"production moved: {move.expert} {move.candidate}")
            except LorafleetError as exc:
                log.warning(
                    "rollout %s: production of %s not moved: %s", state.name, move.expert, exc
                )
                done.append(
                    f"production not moved: {move.expert} {move.candidate} ({exc}); run "
                    f"`lorafleet registry promote --registry {handoff.uri} {move.expert} {move.candidate}`"
                )
        return handoff.model_copy(update={"outcome": "; ".join(done)})

    # -- the reconcile step ---------------------------------------------------------------------

    def reconcile(self, name: str) -> RolloutState:
        """One controller tick for one rollout: heal the weight, analyse when due, decide.

        Returns:
            The state after the tick.
        """
        state = self.store.load(name)
        if state.final:
            return self._settle(name)
        actuator = self.actuator(state)
        actuator.apply(state.weight)
        now = self.clock()
        if state.phase != "Progressing":
            return state
        if (
            state.last_analysis_at is not None
            and now - state.last_analysis_at < state.policy.analysis.interval_seconds
        ):
            return state
        waiting = actuator.waiting()
        if waiting:

            def wait(s: RolloutState) -> RolloutState | None:
                if s.revision != state.revision:
                    return None
                # No analysis yet, and the step's clock starts once the canary serves.
                return _updated(s, message=waiting, last_analysis_at=now, step_started_at=now)

            return self._store_tick(state, wait, actuator)
        source = self.source(state)
        stable = canary = None
        try:
            versions = actuator.versions()
            if source.needs_baseline and state.baseline is None:
                baseline = source.snapshot(actuator.target, versions)
                return self._store_tick(
                    state, lambda s: _updated(s, baseline=baseline, last_analysis_at=now), actuator
                )
            stable, canary, baseline = source.measure(
                actuator.target, state.policy, versions, state.baseline
            )
        except LorafleetError as exc:
            verdict, reasons, baseline = "Error", [str(exc)], state.baseline
        else:
            verdict, reasons = judge(canary, state.policy)

        def change(s: RolloutState) -> RolloutState | None:
            if s.revision != state.revision:
                return None  # someone acted meanwhile (pause, promote): this analysis is stale
            s.last_analysis_at, s.baseline, s.message = now, baseline, ""
            action = self._decide(s, verdict, now)
            s.record(self._decision(state, verdict, action, reasons, stable, canary))
            return s

        return self._store_tick(state, change, actuator)

    def _decide(self, s: RolloutState, verdict: Verdict, now: float) -> str:
        """Apply one analysis' verdict to ``s`` (counters, phase, step); returns the action."""
        policy = s.policy
        if verdict == "Error":
            s.errors += 1
            if s.errors >= policy.analysis.error_limit:
                s.phase, s.weight = "Aborted", 0
                s.message = f"{s.errors} analyses in a row could not measure"
                return "abort"
            return "hold"
        s.errors = 0
        if verdict == "Failed":
            s.failures += 1
            if s.failures >= policy.failure_limit:
                s.phase, s.weight = "RolledBack", 0
                s.message = f"{s.failures} failed analyses (failure_limit {policy.failure_limit})"
                return "rollback"
            return "hold"
        if verdict == "Inconclusive":
            s.inconclusive += 1
            if s.inconclusive >= policy.inconclusive_limit:
                s.phase = "Paused"
                s.message = (
                    f"{s.inconclusive} inconclusive analyses in a row: resume, promote or roll back"
                )
                return "pause"
            return "hold"
        s.inconclusive = 0
        if now - s.step_started_at < policy.pause_seconds:
            return "hold"
        s.step += 1
        s.weight, s.step_started_at = s.steps[s.step], now
        if s.weight >= 100:
            s.phase, s.message = "Promoted", "every step passed its analysis"
            return "promote"
        return f"advance to {s.weight}%"

    def _store_tick(self, state: RolloutState, change, actuator: Actuator) -> RolloutState:
        new, written = self._update(state.name, change)
        if written and new.weight != state.weight:
            actuator.apply(new.weight)
        if new.final:
            return self._settle(new.name, actuator)
        return new

    # -- loops ----------------------------------------------------------------------------------

    def drive(
        self,
        name: str,
        timeout_s: float | None = None,
        on_tick: Callable[[RolloutState], None] | None = None,
        stop: threading.Event | None = None,
    ) -> RolloutState:
        """Reconcile one rollout until it ends (or ``timeout_s`` passes, or ``stop`` is set).

        Args:
            name: the rollout.
            timeout_s: give up after this long (the rollout stays as it is); ``None``: never.
            on_tick: called with the state after every tick.
            stop: set it to return early.

        Returns:
            The last state.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        stop = stop or threading.Event()
        while True:
            state = self.reconcile(name)
            if on_tick is not None:
                on_tick(state)
            if (
                state.final
                or stop.is_set()
                or (deadline is not None and time.monotonic() >= deadline)
            ):
                return state
            stop.wait(_sleep_for(state, self.clock()))


def _sleep_for(state: RolloutState, now: float) -> float:
    """Until the next analysis is due: short enough to react to commands within a second."""
    interval = state.policy.analysis.interval_seconds
    due = interval if state.last_analysis_at is None else state.last_analysis_at + interval - now
    return min(max(due, 0.05), 1.0)


def _updated(state: RolloutState, **fields) -> RolloutState:
    """``state`` with ``fields`` set (for the store's read-modify-write callbacks)."""
    for key, value in fields.items():
        setattr(state, key, value)
    return state


def _moved(target: Target) -> str:
    """What a rollout moves: a route of the router, or an InferenceService's traffic."""
    if target.mode == "router":
        return f"route {target.route!r}"
    return f"InferenceService {target.namespace}/{target.isvc}"


def _one_line(error: Exception) -> str:
    """A log line for an error: ours as they are, others with their type (a connection
    error's text alone rarely says what failed)."""
    if isinstance(error, LorafleetError):
        return str(error)
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def run_controller(
    controller: Controller,
    poll_s: float = 1.0,
    stop: threading.Event | None = None,
    heartbeat: Path | None = None,
) -> None:
    """Reconcile every rollout of the store until ``stop`` is set (the in-cluster controller).

    A rollout whose tick fails (router unreachable, API error, a dropped connection to the
    API server, or any other error) is logged and tried again on the next round; the others
    go on. Only ``stop`` ends the loop: a controller that died on one error would leave
    every rollout where it stood.

    Args:
        controller: the controller (its store names the rollouts).
        poll_s: seconds between rounds.
        stop: set it to return.
        heartbeat: a file touched after every round (a liveness probe reads its age).
    """
    stop = stop or threading.Event()
    while not stop.is_set():
        try:
            names = controller.store.names()
        except Exception as exc:  # the API server is away: try again next round
            log.warning("listing rollouts: %s", _one_line(exc))
            names = []
        for name in names:
            try:
                before = controller.store.load(name)
                if before.final and before.settled:
                    continue
                after = controller.reconcile(name)
            except Exception as exc:  # retried next round; never the end of the loop
                log.warning("rollout %s: %s", name, _one_line(exc))
                continue
            if after.history and (not before.history or after.history[-1] != before.history[-1]):
                last = after.history[-1]
                log.info(
                    "rollout %s: %s at %d%%: %s (%s)",
                    name,
                    last.verdict,
                    last.weight,
                    last.action,
                    "; ".join(last.reasons),
                )
        if heartbeat is not None:
            heartbeat.touch()
        stop.wait(poll_s)
