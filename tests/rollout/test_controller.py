"""The controller against kmock: creation, weight patches, transitions, restarts, idempotence.

kmock's KubernetesEmulator stands in for the Kubernetes API server: the official
``kubernetes`` client creates, reads and merge-patches the rollout ConfigMaps and the
InferenceService in its memory as it would on a cluster. kmock runs no KServe controller,
so the InferenceService's status (the revision names) is written by the test. Metrics come
from a Prometheus-API-shaped HTTP server (tests/rollout/conftest.py), and time from a clock
the test moves, so each tick's decision is exact. The controller object is rebuilt for
every tick: nothing may survive in it between calls.
"""

from __future__ import annotations

import asyncio

import pytest
from kubernetes.client import CoreV1Api, CustomObjectsApi

from lorafleet.errors import LorafleetError
from lorafleet.fleet import CanaryPolicy
from lorafleet.rollout.controller import Controller, judge
from lorafleet.rollout.state import Measurement, Target
from lorafleet.rollout.store import ConfigMapStore, Conflict, NotFound

NS, ISVC = "fleet", "marketplace-prod"
STABLE, CANARY = "marketplace-prod-predictor-00001", "marketplace-prod-predictor-00002"
GROUP = ("serving.kserve.io", "v1beta1")


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


def policy_for(url: str, **changes) -> CanaryPolicy:
    raw = {
        "mode": "revision",
        "steps": [10, 25, 50, 100],
        "pause_seconds": 20,
        "max_error_rate": 0.02,
        "max_p95_latency_ms": 500,
        "failure_limit": 2,
        "inconclusive_limit": 2,
        "analysis": {
            "source": "prometheus",
            "prometheus_url": url,
            "interval_seconds": 10,
            "min_requests": 20,
            "error_limit": 2,
        },
    }
    for key, value in changes.items():
        raw[key] = value
    return CanaryPolicy.model_validate(raw)


TARGET = Target(mode="revision", namespace=NS, isvc=ISVC)


def _create_isvc(api) -> None:
    body = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": ISVC, "namespace": NS},
        "spec": {
            "predictor": {
                "model": {"modelFormat": {"name": "lorafleet"}, "runtime": "lorafleet-lorafleet"}
            }
        },
        "status": {
            "components": {
                "predictor": {"latestCreatedRevision": CANARY, "previousRolledoutRevision": STABLE}
            }
        },
    }
    CustomObjectsApi(api).create_namespaced_custom_object(*GROUP, NS, "inferenceservices", body)


def _canary_percent(api) -> int | None:
    isvc = CustomObjectsApi(api).get_namespaced_custom_object(*GROUP, NS, "inferenceservices", ISVC)
    return isvc["spec"]["predictor"].get("canaryTrafficPercent")


def _healthy(prometheus, requests: float = 200) -> None:
    prometheus.set(STABLE, requests=requests * 3, error_rate=0.0, p95_latency_ms=120)
    prometheus.set(CANARY, requests=requests, error_rate=0.005, p95_latency_ms=150)


def _controller(api, clock) -> Controller:
    """A fresh controller, as after a restart: only the cluster holds the state."""
    return Controller(ConfigMapStore(api, NS), api, clock)


def run(fn, *args):
    return asyncio.to_thread(fn, *args)


async def test_start_creates_the_state_configmap_and_sets_the_first_weight(k8s, prometheus) -> None:
    clock = Clock()
    await run(_create_isvc, k8s)
    policy = policy_for(prometheus.url)
    state = await run(_controller(k8s, clock).start, "writer", TARGET, policy)
    assert (state.phase, state.step, state.weight, state.revision) == ("Progressing", 0, 10, 1)
    assert await run(_canary_percent, k8s) == 10
    cm = await run(CoreV1Api(k8s).read_namespaced_config_map, "lorafleet-rollout-writer", NS)
    assert cm.metadata.labels["lorafleet.io/rollout"] == "writer"
    assert '"phase":"Progressing"' in cm.data["state.json"]
    # The same start again changes nothing
    again = await run(_controller(k8s, clock).start, "writer", TARGET, policy)
    assert again.revision == state.revision and again.history == state.history
    # A different canary while this one runs is refused, in one line
    other = TARGET.model_copy(update={"canary": "marketplace-prod-predictor-00003"})
    with pytest.raises(LorafleetError, match="'writer' is Progressing with another target"):
        await run(_controller(k8s, clock).start, "writer", other, policy)


async def test_successful_analyses_walk_every_step_and_promote(k8s, prometheus) -> None:
    clock = Clock()
    await run(_create_isvc, k8s)
    await run(_controller(k8s, clock).start, "writer", TARGET, policy_for(prometheus.url))
    _healthy(prometheus)
    seen = []
    for _ in range(12):
        clock.tick(10)
        state = await run(_controller(k8s, clock).reconcile, "writer")
        seen.append((state.weight, await run(_canary_percent, k8s)))
        if state.final:
            break
    # 10% for 20 s (two analyses), 25% for 20 s, 50% for 20 s, then promoted: the field is removed
    assert seen == [(10, 10), (25, 25), (25, 25), (50, 50), (50, 50), (100, None)]
    assert (state.phase, state.settled) == ("Promoted", True)
    analyses = [d for d in state.history if d.verdict != "Manual"]
    assert [d.action for d in analyses] == [
        "hold",
        "advance to 25%",
        "hold",
        "advance to 50%",
        "hold",
        "promote",
    ]
    last = analyses[-1]
    assert (
        last.canary.version == CANARY and last.stable.version == STABLE
    )  # names from the ISVC status
    assert (last.canary.requests, last.canary.error_rate, last.canary.p95_latency_ms) == (
        200,
        0.005,
        150,
    )
    # ticking a finished rollout changes nothing
    clock.tick(60)
    assert (await run(_controller(k8s, clock).reconcile, "writer")).revision == state.revision


async def test_failures_roll_back_at_the_failure_limit(k8s, prometheus) -> None:
    clock = Clock()
    await run(_create_isvc, k8s)
    await run(_controller(k8s, clock).start, "writer", TARGET, policy_for(prometheus.url))
    _healthy(prometheus)
    prometheus.set(CANARY, requests=200, error_rate=0.3, p95_latency_ms=150)
    clock.tick(10)
    first = await run(_controller(k8s, clock).reconcile, "writer")
    assert (first.phase, first.failures, first.history[-1].action) == (
        "Progressing",
        1,
        "hold",
    )  # failure_limit 2
    clock.tick(10)
    state = await run(_controller(k8s, clock).reconcile, "writer")
    assert (state.phase, state.weight, state.failures, state.settled) == ("RolledBack", 0, 2, True)
    assert await run(_canary_percent, k8s) == 0  # KServe: all traffic to the previous revision
    last = state.history[-1]
    assert (last.verdict, last.action, last.weight) == ("Failed", "rollback", 10)
    assert last.reasons[0] == "error rate 30.0% > max 2.0%"
    assert last.canary.error_rate == 0.3
    # promoting a rolled-back canary is refused; rolling back again is a no-op
    with pytest.raises(LorafleetError, match="is RolledBack; start a new rollout"):
        await run(_controller(k8s, clock).promote, "writer")
    again = await run(_controller(k8s, clock).rollback, "writer")
    assert again.revision == state.revision and again.phase == "RolledBack"


async def test_inconclusive_pauses_and_resume_continues(k8s, prometheus) -> None:
    clock = Clock()
    await run(_create_isvc, k8s)
    await run(_controller(k8s, clock).start, "writer", TARGET, policy_for(prometheus.url))
    _healthy(prometheus, requests=5)  # below min_requests 20
    for _ in range(2):
        clock.tick(10)
        state = await run(_controller(k8s, clock).reconcile, "writer")
    assert (state.phase, state.inconclusive, state.weight) == ("Paused", 2, 10)
    assert state.history[-1].reasons == ["5 canary requests < min_requests 20"]
    # paused: no analysis runs, the weight holds
    clock.tick(30)
    paused = await run(_controller(k8s, clock).reconcile, "writer")
    assert paused.revision == state.revision and await run(_canary_percent, k8s) == 10
    _healthy(prometheus)
    resumed = await run(_controller(k8s, clock).resume, "writer")
    assert (resumed.phase, resumed.inconclusive) == ("Progressing", 0)
    assert (
        await run(_controller(k8s, clock).resume, "writer")
    ).revision == resumed.revision  # idempotent
    clock.tick(10)
    state = await run(_controller(k8s, clock).reconcile, "writer")
    assert (state.weight, state.history[-1].action) == (25, "advance to 25%")


async def test_restart_continues_at_the_same_step_and_heals_the_weight(k8s, prometheus) -> None:
    clock = Clock()
    await run(_create_isvc, k8s)
    await run(_controller(k8s, clock).start, "writer", TARGET, policy_for(prometheus.url))
    _healthy(prometheus)
    for _ in range(2):
        clock.tick(10)
        await run(_controller(k8s, clock).reconcile, "writer")
    # The controller dies after writing "25%" but before the patch reached the ISVC:
    # the cluster says 25% in the state and 10% on the InferenceService.
    patch = {"spec": {"predictor": {"canaryTrafficPercent": 10}}}
    await run(
        CustomObjectsApi(k8s).patch_namespaced_custom_object,
        *GROUP,
        NS,
        "inferenceservices",
        ISVC,
        patch,
    )
    # A new controller (new client, nothing in memory) takes over before the next analysis is due
    clock.tick(1)
    with_new_client = _controller(k8s, clock)
    state = await run(with_new_client.reconcile, "writer")
    assert (state.phase, state.step, state.weight) == ("Progressing", 1, 25)
    assert await run(_canary_percent, k8s) == 25, (
        "the stored weight is re-applied, not the first step's"
    )
    for _ in range(4):
        clock.tick(10)
        state = await run(_controller(k8s, clock).reconcile, "writer")
    assert state.phase == "Promoted"
    weights = [d.weight for d in state.history if d.verdict != "Manual"]
    assert weights == sorted(weights), "never went back to an earlier step"


async def test_commands_are_idempotent(k8s, prometheus) -> None:
    clock = Clock()
    await run(_create_isvc, k8s)
    await run(_controller(k8s, clock).start, "writer", TARGET, policy_for(prometheus.url))
    paused = await run(_controller(k8s, clock).pause, "writer")
    assert (await run(_controller(k8s, clock).pause, "writer")).revision == paused.revision
    promoted = await run(_controller(k8s, clock).promote, "writer")
    assert (promoted.phase, promoted.weight, promoted.settled) == ("Promoted", 100, True)
    assert await run(_canary_percent, k8s) is None
    twice = await run(_controller(k8s, clock).promote, "writer")
    assert twice.model_dump() == promoted.model_dump()
    with pytest.raises(LorafleetError, match="is Promoted: the canary is production now"):
        await run(_controller(k8s, clock).rollback, "writer")
    with pytest.raises(LorafleetError, match="has ended \\(Promoted\\): nothing to pause"):
        await run(_controller(k8s, clock).pause, "writer")
    assert [d.action for d in twice.history] == ["start at 10%", "pause", "promote"]


async def test_unreadable_metrics_abort_at_the_error_limit(k8s, prometheus) -> None:
    clock = Clock()
    await run(_create_isvc, k8s)
    await run(_controller(k8s, clock).start, "writer", TARGET, policy_for(prometheus.url))
    prometheus.fail = True
    for _ in range(2):
        clock.tick(10)
        state = await run(_controller(k8s, clock).reconcile, "writer")
    assert (state.phase, state.errors, state.weight) == ("Aborted", 2, 0)
    assert state.history[-1].verdict == "Error" and "503" in state.history[-1].reasons[0]
    assert await run(_canary_percent, k8s) == 0


async def test_a_stale_write_is_refused(k8s, prometheus) -> None:
    clock = Clock()
    await run(_create_isvc, k8s)
    store = ConfigMapStore(k8s, NS)
    state = await run(
        Controller(store, k8s, clock).start, "writer", TARGET, policy_for(prometheus.url)
    )
    await run(_controller(k8s, clock).pause, "writer")  # an operator acts meanwhile
    with pytest.raises(Conflict):
        await run(store.save, state)  # a write based on the older state
    assert (await run(store.load, "writer")).phase == "Paused"
    assert await run(store.names) == ["writer"]


def test_judge_fails_first_then_inconclusive_then_successful() -> None:
    policy = CanaryPolicy.model_validate(
        {
            "max_error_rate": 0.01,
            "max_p95_latency_ms": 300,
            "analysis": {"min_requests": 10, "judge": {"min_score": 3.5}},
        }
    )

    def m(**kw) -> Measurement:
        return Measurement(
            version="v2",
            **{
                "requests": 50,
                "error_rate": 0.0,
                "p95_latency_ms": 100,
                "judge_score": 4.0,
                "judge_samples": 3,
                **kw,
            },
        )

    assert judge(m(), policy)[0] == "Successful"
    assert judge(m(requests=9), policy) == ("Inconclusive", ["9 canary requests < min_requests 10"])
    verdict, reasons = judge(m(p95_latency_ms=None, error_rate=0.05), policy)
    assert (
        verdict == "Failed" and reasons[0] == "error rate 5.0% > max 1.0%"
    )  # a failure wins over missing data
    assert judge(m(judge_score=None, judge_samples=0), policy)[0] == "Inconclusive"
    assert judge(m(judge_score=3.0), policy) == (
        "Failed",
        ["judge score 3.00 < min 3.5", "error rate 0.0% <= 1.0%", "p95 100 ms <= 300 ms"],
    )


async def test_a_revision_that_is_not_ready_yet_is_not_judged(k8s, prometheus) -> None:
    clock = Clock()
    await run(_create_isvc, k8s)
    status = {
        "status": {
            "components": {
                "predictor": {"latestCreatedRevision": CANARY, "latestReadyRevision": STABLE}
            }
        }
    }
    custom = CustomObjectsApi(k8s)
    await run(
        custom.patch_namespaced_custom_object_status, *GROUP, NS, "inferenceservices", ISVC, status
    )
    await run(_controller(k8s, clock).start, "writer", TARGET, policy_for(prometheus.url))
    prometheus.fail = True  # it would be an Error if it were measured
    for _ in range(3):
        clock.tick(10)
        state = await run(_controller(k8s, clock).reconcile, "writer")
    assert (state.phase, state.errors, len(state.history)) == ("Progressing", 0, 1)
    assert state.message == f"waiting for revision {CANARY} to be ready (latest ready: {STABLE})"
    # KServe made it ready: the step's clock starts now, so the first analysis holds
    status["status"]["components"]["predictor"]["latestReadyRevision"] = CANARY
    await run(
        custom.patch_namespaced_custom_object_status, *GROUP, NS, "inferenceservices", ISVC, status
    )
    prometheus.fail = False
    _healthy(prometheus)
    clock.tick(10)
    state = await run(_controller(k8s, clock).reconcile, "writer")
    assert (state.history[-1].verdict, state.history[-1].action, state.message) == (
        "Successful",
        "hold",
        "",
    )


def test_the_controller_loop_survives_any_error_and_retries_next_round(tmp_path, caplog) -> None:
    """Given a store whose API server drops the connection twice (not a LorafleetError),
    the loop logs each failure and keeps going: it lists again on the next rounds."""
    import logging
    import threading

    from lorafleet.rollout.controller import Controller, run_controller
    from lorafleet.rollout.store import FileStore

    class FlakyStore(FileStore):
        calls = 0

        def names(self) -> list[str]:
            FlakyStore.calls += 1
            if FlakyStore.calls <= 2:
                raise ConnectionResetError("Connection reset by peer")
            if FlakyStore.calls >= 4:
                stop.set()
            return super().names()

    stop = threading.Event()
    heartbeat = tmp_path / "alive"
    with caplog.at_level(logging.WARNING, logger="lorafleet"):
        thread = threading.Thread(
            target=run_controller,
            args=(Controller(FlakyStore(tmp_path / "state")),),
            kwargs={"poll_s": 0.01, "stop": stop, "heartbeat": heartbeat},
        )
        thread.start()
        thread.join(10)
    assert not thread.is_alive() and FlakyStore.calls >= 4 and heartbeat.exists()
    assert (
        caplog.text.count("listing rollouts: ConnectionResetError: Connection reset by peer") == 2
    )


async def test_a_start_that_fails_at_the_first_weight_leaves_no_configmap(k8s, prometheus) -> None:
    # No InferenceService to move (revision mode): the first weight cannot be applied
    clock = Clock()
    policy = policy_for(prometheus.url)
    target = TARGET.model_copy(update={"isvc": "no-such-isvc"})
    with pytest.raises(LorafleetError):
        await run(_controller(k8s, clock).start, "ghost", target, policy)
    store = ConfigMapStore(k8s, NS)
    assert "ghost" not in await run(store.names)
    with pytest.raises(NotFound):
        await run(store.load, "ghost")


async def test_the_configmap_store_forgets_a_rollout(k8s, prometheus) -> None:
    # What a start that could not move its first weight does to the state it stored
    clock = Clock()
    await run(_create_isvc, k8s)
    state = await run(
        _controller(k8s, clock).start, "short-lived", TARGET, policy_for(prometheus.url)
    )
    store = ConfigMapStore(k8s, NS)
    assert "short-lived" in await run(store.names)
    await run(store.delete, state.name)
    await run(store.delete, state.name)  # absent is fine
    assert "short-lived" not in await run(store.names)
    with pytest.raises(NotFound):
        await run(store.load, "short-lived")
