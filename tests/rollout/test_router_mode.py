"""Adapter-level canary: the controller moves one route's weights on real router processes.

Two real router proxies (``python -m lorafleet.serve.router``) run on 127.0.0.1 as two
replicas; their upstream is a closed port, so completions through them fail with 503 and
are counted as such. The rollout state is a local file (the local mode's store). Metrics
for the decisions come from the Prometheus-API-shaped server, so the weights, not the
numbers, are under test here; the router's own /metrics are read in the last test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lorafleet.errors import LorafleetError
from lorafleet.fleet import CanaryPolicy
from lorafleet.rollout.controller import Controller
from lorafleet.rollout.sources import RouterSource
from lorafleet.rollout.state import Target
from lorafleet.rollout.store import FileStore

pytestmark = pytest.mark.integration

CLOSED = "http://127.0.0.1:9"  # nothing listens: requests through the router get 503


@pytest.fixture(scope="module")
def routers(rkit) -> Iterator[list[str]]:
    routes = {
        "writer": {
            "targets": [{"adapter": "writer-v1", "weight": 100}],
            "sticky_header": "x-user-id",
        },
        "analyzer": {"targets": [{"adapter": "analyzer-v7", "weight": 100}]},
    }
    with rkit.run_router(CLOSED, routes) as first, rkit.run_router(CLOSED, routes) as second:
        yield [first, second]


def _route(url: str, name: str, token: str) -> dict:
    response = httpx.get(f"{url}/admin/routes/{name}", headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    body = response.json()
    return {
        "weights": {t["adapter"]: t["weight"] for t in body["targets"]},
        "sticky": body["sticky_header"],
    }


def _policy(prometheus) -> CanaryPolicy:
    return CanaryPolicy.model_validate(
        {
            "steps": [20, 50, 100],
            "pause_seconds": 0,
            "failure_limit": 1,
            "analysis": {
                "source": "prometheus",
                "prometheus_url": prometheus.url,
                "interval_seconds": 5,
                "min_requests": 10,
            },
        }
    )


class Clock:
    now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_weights_move_on_every_replica_and_other_routes_stay(
    routers, admin_token, prometheus, tmp_path: Path
) -> None:
    clock = Clock()
    controller = Controller(FileStore(tmp_path), clock=clock)
    target = Target(
        route="writer",
        stable="writer-v1",
        canary="writer-v2",
        router_urls=routers,
        sticky_header="x-user-id",
    )
    state = controller.start("writer", target, _policy(prometheus))
    assert state.weight == 20
    for url in routers:
        assert _route(url, "writer", admin_token) == {
            "weights": {"writer-v1": 80, "writer-v2": 20},
            "sticky": "x-user-id",
        }
    # A replica restarted with its old routes file: the next tick puts the weight back
    httpx.put(
        f"{routers[1]}/admin/routes/writer",
        headers={"authorization": f"Bearer {admin_token}"},
        json={"targets": [{"adapter": "writer-v1", "weight": 100}]},
    ).raise_for_status()
    controller.reconcile("writer")
    assert _route(routers[1], "writer", admin_token)["weights"] == {
        "writer-v1": 80,
        "writer-v2": 20,
    }
    # Healthy analyses walk the steps; at 100% the route holds only the canary
    prometheus.set("writer-v1", requests=100, error_rate=0, p95_latency_ms=50)
    prometheus.set("writer-v2", requests=30, error_rate=0, p95_latency_ms=60)
    seen = []
    while not state.final:
        clock.now += 5
        state = controller.reconcile("writer")
        seen.append(_route(routers[0], "writer", admin_token)["weights"])
    assert seen == [{"writer-v1": 50, "writer-v2": 50}, {"writer-v2": 100}]
    for url in routers:
        assert _route(url, "analyzer", admin_token)["weights"] == {"analyzer-v7": 100}  # untouched


def test_a_failed_analysis_sends_everything_back_to_stable(
    routers, admin_token, prometheus, tmp_path: Path
) -> None:
    clock = Clock()
    controller = Controller(FileStore(tmp_path), clock=clock)
    target = Target(route="writer", stable="writer-v1", canary="writer-v2", router_urls=routers)
    controller.start("writer", target, _policy(prometheus))
    prometheus.set("writer-v2", requests=30, error_rate=0.5, p95_latency_ms=60)
    clock.now += 5
    state = controller.reconcile("writer")
    assert (state.phase, state.settled) == ("RolledBack", True)
    for url in routers:
        assert _route(url, "writer", admin_token)["weights"] == {"writer-v1": 100}


def test_without_the_admin_token_nothing_starts(
    routers, monkeypatch, prometheus, tmp_path: Path
) -> None:
    monkeypatch.delenv("LORAFLEET_ADMIN_TOKEN", raising=False)
    target = Target(route="writer", stable="writer-v1", canary="writer-v2", router_urls=routers)
    with pytest.raises(LorafleetError, match=r"^\$LORAFLEET_ADMIN_TOKEN is not set"):
        Controller(FileStore(tmp_path)).start("writer", target, _policy(prometheus))
    assert FileStore(tmp_path).names() == []


def test_router_source_measures_the_interval_from_the_routers_metrics(routers, admin_token) -> None:
    target = Target(route="writer", stable="writer-v1", canary="writer-v2", router_urls=routers)
    policy = CanaryPolicy()
    for url in routers:
        httpx.put(
            f"{url}/admin/routes/writer",
            headers={"authorization": f"Bearer {admin_token}"},
            json={"targets": [{"adapter": "writer-v2", "weight": 100}]},
        ).raise_for_status()
    source = RouterSource(policy)
    baseline = source.snapshot(target, ("writer-v1", "writer-v2"))
    body = {"model": "writer", "messages": [{"role": "user", "content": "hi"}]}
    for url, count in zip(routers, (7, 4), strict=True):
        for _ in range(count):
            response = httpx.post(f"{url}/openai/v1/chat/completions", json=body)
            assert (
                response.status_code == 503
            )  # upstream down: counted for the version it was sent to
    stable, canary, new_baseline = source.measure(
        target, policy, ("writer-v1", "writer-v2"), baseline
    )
    assert (canary.requests, canary.errors, canary.error_rate) == (11, 11, 1.0), (
        "summed over both replicas"
    )
    assert canary.p95_latency_ms is not None
    assert stable.requests == 0 and stable.error_rate is None
    again = source.measure(target, policy, ("writer-v1", "writer-v2"), new_baseline)[1]
    assert again.requests == 0, "the next interval starts where this one ended"


def _reset(routers: list[str], token: str, route: dict) -> None:
    for url in routers:
        httpx.put(
            f"{url}/admin/routes/analyzer",
            headers={"authorization": f"Bearer {token}"},
            json=route,
        ).raise_for_status()


def test_a_start_that_cannot_move_the_weights_leaves_no_rollout(
    routers, admin_token, prometheus, tmp_path: Path
) -> None:
    # Given a replica list with one router that does not answer
    store = FileStore(tmp_path)
    broken = Target(
        route="analyzer", stable="analyzer-v7", canary="analyzer-v8", router_urls=[*routers, CLOSED]
    )
    with pytest.raises(LorafleetError, match=r"127\.0\.0\.1:9"):
        Controller(store).start("analyzer", broken, _policy(prometheus))
    # Then nothing is stored, so the corrected start is accepted
    assert store.names() == []
    fixed = broken.model_copy(update={"router_urls": routers})
    assert Controller(store).start("analyzer", fixed, _policy(prometheus)).weight == 20
    _reset(routers, admin_token, {"targets": [{"adapter": "analyzer-v7", "weight": 100}]})


def test_one_rollout_per_route_and_the_routes_sticky_header_is_kept(
    routers, admin_token, prometheus, tmp_path: Path
) -> None:
    _reset(
        routers,
        admin_token,
        {"targets": [{"adapter": "analyzer-v7", "weight": 100}], "sticky_header": "x-team"},
    )
    controller = Controller(FileStore(tmp_path))
    # A start that names no sticky header keeps the route's own
    target = Target(
        route="analyzer", stable="analyzer-v7", canary="analyzer-v8", router_urls=routers
    )
    controller.start("first", target, _policy(prometheus))
    for url in routers:
        assert _route(url, "analyzer", admin_token)["sticky"] == "x-team"
    # A second rollout of the same route, under another name, is refused
    other = target.model_copy(update={"canary": "analyzer-v9"})
    with pytest.raises(
        LorafleetError, match=r"rollout 'first' is Progressing on the same route 'analyzer'"
    ):
        controller.start("second", other, _policy(prometheus))
    assert controller.store.names() == ["first"]
    assert _route(routers[0], "analyzer", admin_token)["weights"] == {
        "analyzer-v7": 80,
        "analyzer-v8": 20,
    }
    _reset(routers, admin_token, {"targets": [{"adapter": "analyzer-v7", "weight": 100}]})
