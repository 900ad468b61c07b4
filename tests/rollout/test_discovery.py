"""Router replicas found through a Kubernetes Service's EndpointSlices (``k8s://NS/SVC:PORT``).

kmock's KubernetesEmulator stands in for the Kubernetes API server: the test writes the
``discovery.k8s.io/v1`` EndpointSlices that the EndpointSlice controller would write for a
Service, and the controller lists them with the official ``kubernetes`` client as it would
on a cluster (kmock ignores label selectors, so slices of another Service in the namespace
also check that the controller filters by ``kubernetes.io/service-name``). The replicas are
real router processes (``python -m lorafleet.serve.router``) on 127.0.0.1, one slice per
replica because each listens on its own port (the port is picked by its name, ``http``);
their upstream is a small HTTP server that answers every completion with 200. Time comes
from a clock the test moves, so each tick's analysis is exact.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from kubernetes.client import (
    DiscoveryV1Api,
    DiscoveryV1EndpointPort,
    V1Endpoint,
    V1EndpointConditions,
    V1EndpointSlice,
    V1ObjectMeta,
)

from lorafleet.errors import LorafleetError
from lorafleet.fleet import CanaryPolicy, FleetSpec
from lorafleet.rollout.controller import Controller, run_controller
from lorafleet.rollout.deploy import deploy_rollouts
from lorafleet.rollout.discovery import DiscoveryError, resolve_urls
from lorafleet.rollout.manifests import controller_objects
from lorafleet.rollout.state import Target
from lorafleet.rollout.store import FileStore

pytestmark = pytest.mark.integration

NS, SERVICE = "lorafleet", "fleet-transformer"
ROUTER_SERVICE = f"k8s://{NS}/{SERVICE}:http"
STABLE, CANARY = "writer-v1", "writer-v2"
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(fn, *args, **kwargs):
    """Sync client code off the event loop (kmock serves on it)."""
    return asyncio.to_thread(fn, *args, **kwargs)


class Clock:
    now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """Answers every POST with a small completion (200): the routers count successes."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            data = json.dumps(
                {
                    "choices": [{"message": {"content": "ok"}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1},
                }
            ).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def replicas(rkit, upstream) -> Iterator[list[str]]:
    """Three router replicas, each starting with all of ``writer`` on the stable version."""
    routes = {"writer": {"targets": [{"adapter": STABLE, "weight": 100}]}}
    with (
        rkit.run_router(upstream, routes) as a,
        rkit.run_router(upstream, routes) as b,
        rkit.run_router(upstream, routes) as c,
    ):
        yield [a, b, c]


@pytest.fixture
def api(k8s, kmock, replicas, rkit):
    """The ApiClient on kmock, with EndpointSlices, and every replica back on stable only."""
    kmock.resources["discovery.k8s.io/v1/endpointslices"] = {}
    for url in replicas:
        httpx.put(
            f"{url}/admin/routes/writer",
            headers={"authorization": f"Bearer {rkit.TOKEN}"},
            json={"targets": [{"adapter": STABLE, "weight": 100}]},
        ).raise_for_status()
    return k8s


def _slice(
    name: str,
    port: int,
    addresses: list[tuple[str, bool | None]],
    service: str = SERVICE,
    port_name: str = "http",
    address_type: str = "IPv4",
) -> V1EndpointSlice:
    return V1EndpointSlice(
        api_version="discovery.k8s.io/v1",
        kind="EndpointSlice",
        address_type=address_type,
        metadata=V1ObjectMeta(
            name=name, namespace=NS, labels={"kubernetes.io/service-name": service}
        ),
        endpoints=[
            V1Endpoint(addresses=[ip], conditions=V1EndpointConditions(ready=ready))
            for ip, ready in addresses
        ],
        ports=[DiscoveryV1EndpointPort(name=port_name, port=port, protocol="TCP")],
    )


def _publish(api, url: str, ready: bool | None = True) -> None:
    """The slice of the replica at ``url`` (created, or replaced with the new readiness)."""
    port = int(url.rsplit(":", 1)[1])
    body = _slice(f"{SERVICE}-{port}", port, [("127.0.0.1", ready)])
    slices = DiscoveryV1Api(api)
    names = [s.metadata.name for s in slices.list_namespaced_endpoint_slice(NS).items]
    if body.metadata.name in names:  # kmock takes no PUT: the slice is written anew
        slices.delete_namespaced_endpoint_slice(body.metadata.name, NS)
    slices.create_namespaced_endpoint_slice(NS, body)


def _withdraw(api, url: str) -> None:
    """The replica's pod is gone: its slice with it."""
    DiscoveryV1Api(api).delete_namespaced_endpoint_slice(f"{SERVICE}-{url.rsplit(':', 1)[1]}", NS)


def _weights(url: str, token: str) -> dict[str, float]:
    response = httpx.get(f"{url}/admin/routes/writer", headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    return {t["adapter"]: t["weight"] for t in response.json()["targets"]}


def _send(url: str, n: int) -> dict[str, int]:
    """``n`` completions through one replica; how many each version served."""
    served = {STABLE: 0, CANARY: 0}
    body = {"model": "writer", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=10) as client:
        for _ in range(n):
            response = client.post(f"{url}/openai/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            served[response.headers["x-lorafleet-adapter"]] += 1
    return served


def _add(*tallies: dict[str, int]) -> dict[str, int]:
    return {v: sum(t[v] for t in tallies) for v in (STABLE, CANARY)}


POLICY = CanaryPolicy.model_validate(
    {
        "steps": [20, 50, 100],
        "pause_seconds": 0,
        "max_error_rate": 0.01,
        "max_p95_latency_ms": 5000,
        "analysis": {"source": "router", "interval_seconds": 5, "min_requests": 1},
    }
)
TARGET = Target(route="writer", stable=STABLE, canary=CANARY, router_urls=[ROUTER_SERVICE])


async def test_ready_endpoints_become_replica_urls(api) -> None:
    slices = DiscoveryV1Api(api)
    for body in (
        _slice("a", 8080, [("10.0.0.2", True), ("10.0.0.1", None), ("10.0.0.9", False)]),
        _slice("b", 8080, [("10.0.0.2", True), ("10.0.0.3", True)]),  # 10.0.0.2 in two slices: once
        _slice("v6", 8080, [("fd00::7", True)], address_type="IPv6"),
        _slice("other", 8080, [("10.9.9.9", True)], service="other-service"),
    ):
        await run(slices.create_namespaced_endpoint_slice, NS, body)
    want = [
        "http://10.0.0.1:8080",
        "http://10.0.0.2:8080",
        "http://10.0.0.3:8080",
        "http://[fd00::7]:8080",
    ]
    # by port name, by number (the pods' port), and without a port (the Service has one)
    for url in (
        f"k8s://{NS}/{SERVICE}:http",
        f"k8s://{NS}/{SERVICE}:8080",
        f"k8s://{NS}/{SERVICE}",
    ):
        assert await run(resolve_urls, [url], api) == want, url
    # plain URLs stay as given, before and after; a replica named twice is called once
    assert await run(
        resolve_urls, ["http://edge:80", f"k8s://{NS}/{SERVICE}", "http://10.0.0.1:8080"], api
    ) == ["http://edge:80", *want]
    with pytest.raises(
        DiscoveryError,
        match=rf"^Service {NS}/{SERVICE}: its endpoints have no port 9000; "
        r"they offer http/8080$",
    ):
        await run(resolve_urls, [f"k8s://{NS}/{SERVICE}:9000"], api)
    with pytest.raises(DiscoveryError, match=rf"^Service {NS}/nothing-here: no ready endpoints"):
        await run(resolve_urls, [f"k8s://{NS}/nothing-here:http"], api)
    # a malformed Service URL is refused when the rollout is defined, in one line
    with pytest.raises(ValueError, match=r"a Service is named k8s://NAMESPACE/SERVICE\[:PORT\]"):
        Target(route="writer", stable=STABLE, canary=CANARY, router_urls=[f"k8s://{SERVICE}"])


async def test_weights_reach_every_discovered_replica_and_a_new_one_is_healed(
    api, replicas, admin_token, tmp_path: Path
) -> None:
    a, b, c = replicas
    # Given: the Service has two ready replicas; the third is not ready yet
    for url in (a, b):
        await run(_publish, api, url)
    await run(_publish, api, c, False)
    clock = Clock()
    controller = Controller(FileStore(tmp_path), api, clock)
    # When: the rollout starts on the Service
    state = await run(controller.start, "writer", TARGET, POLICY)
    # Then: both ready replicas hold the first step, the unready one is not touched
    assert state.weight == 20 and state.target.router_urls == [ROUTER_SERVICE]  # stored as named
    assert [_weights(u, admin_token) for u in (a, b, c)] == [{STABLE: 80, CANARY: 20}] * 2 + [
        {STABLE: 100}
    ]
    assert sorted(state.baseline) == sorted([a, b]), "the baseline covers the replicas found"
    # When: the third becomes ready, and the next tick comes (no analysis due yet)
    await run(_publish, api, c)
    clock.now += 1
    await run(controller.reconcile, "writer")
    # Then: it is healed to the current weights
    assert _weights(c, admin_token) == {STABLE: 80, CANARY: 20}


async def test_replicas_that_leave_are_not_scraped_and_new_ones_count_from_the_next_interval(
    api, replicas, admin_token, tmp_path: Path
) -> None:
    a, b, c = replicas
    for url in replicas:
        await run(_publish, api, url)
    clock = Clock()
    controller = Controller(FileStore(tmp_path), api, clock)
    policy = POLICY.model_copy(update={"steps": [20, 50, 80, 100]})
    await run(controller.start, "writer", TARGET, policy)
    # Given: traffic on all three, then the third replica's pod goes away (its slice with it);
    # what it serves afterwards must not be judged
    counted = _add(await run(_send, a, 20), await run(_send, b, 20))
    await run(_send, c, 20)
    await run(_withdraw, api, c)
    await run(_send, c, 20)
    # When: the analysis is due
    clock.now += 5
    state = await run(controller.reconcile, "writer")
    # Then: it measured exactly the two replicas still there, and the rollout went on
    last = state.history[-1]
    assert (last.verdict, last.action) == ("Successful", "advance to 50%"), last.reasons
    assert (last.stable.requests, last.canary.requests) == (counted[STABLE], counted[CANARY])
    assert sorted(state.baseline) == sorted([a, b]), "the gone replica's baseline is dropped"
    assert [_weights(u, admin_token) for u in (a, b)] == [{STABLE: 50, CANARY: 50}] * 2
    assert _weights(c, admin_token) == {STABLE: 80, CANARY: 20}, "not a replica any more: not moved"
    # Given: the replica comes back (a readiness flap: its counters cover the whole time)
    await run(_publish, api, c)
    counted = await run(_send, a, 20)
    # When: the next analysis is due
    clock.now += 5
    state = await run(controller.reconcile, "writer")
    # Then: it is healed (and moved on with the others), but its old counters are not this interval's
    last = state.history[-1]
    assert last.action == "advance to 80%"
    assert [_weights(u, admin_token) for u in replicas] == [{STABLE: 20, CANARY: 80}] * 3
    assert (last.stable.requests, last.canary.requests) == (counted[STABLE], counted[CANARY])
    assert sorted(state.baseline) == sorted(replicas)
    # ... and from the next interval on it counts like the others
    counted = _add(await run(_send, a, 10), await run(_send, c, 10))
    clock.now += 5
    state = await run(controller.reconcile, "writer")
    last = state.history[-1]
    assert (last.canary.requests + last.stable.requests) == 20
    assert (last.stable.requests, last.canary.requests) == (counted[STABLE], counted[CANARY])
    assert (state.phase, last.action) == ("Promoted", "promote")


async def test_no_ready_endpoints_fails_the_tick_and_moves_nothing(
    api, replicas, admin_token, tmp_path: Path, caplog
) -> None:
    a = replicas[0]
    clock = Clock()
    store = FileStore(tmp_path)
    controller = Controller(store, api, clock)
    # Nothing is ready: the rollout is not even stored
    await run(_publish, api, a, False)
    message = f"Service {NS}/{SERVICE}: no ready endpoints"
    with pytest.raises(DiscoveryError, match=f"^{message}"):
        await run(controller.start, "writer", TARGET, POLICY)
    assert await run(store.names) == []
    # Mid-rollout the replicas stop being ready: every tick fails in one line, nothing moves
    await run(_publish, api, a)
    started = await run(controller.start, "writer", TARGET, POLICY)
    await run(_publish, api, a, False)
    for _ in range(3):
        clock.now += 5
        with pytest.raises(DiscoveryError, match=f"^{message}") as failed:
            await run(controller.reconcile, "writer")
        assert "\n" not in str(failed.value)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    with caplog.at_level(logging.WARNING, logger="lorafleet.rollout"):
        await run(run_controller, controller, 0.1, stop)
    assert any(r.getMessage().startswith(f"rollout writer: {message}") for r in caplog.records)
    state = await run(store.load, "writer")
    assert (state.phase, state.weight, state.revision) == ("Progressing", 20, started.revision)
    assert _weights(a, admin_token) == {STABLE: 80, CANARY: 20}


async def test_cli_names_the_service_and_reads_the_kubeconfig_for_it(
    api, kmock, replicas, rkit, tmp_path: Path
) -> None:
    a, b, _ = replicas
    for url in (a, b):
        await run(_publish, api, url)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "kmock",
                "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
                "users": [{"name": "tester", "user": {"token": "not-checked"}}],
                "contexts": [
                    {
                        "name": "kmock",
                        "context": {"cluster": "kmock", "user": "tester", "namespace": NS},
                    }
                ],
            }
        )
    )
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "LORAFLEET_ADMIN_TOKEN": rkit.TOKEN}
    # a local rollout (state in a directory) whose replicas are the Service's, in the context's namespace
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "lorafleet"),
        "rollout",
        "start",
        "writer",
        "--route",
        "writer",
        "--stable",
        STABLE,
        "--canary",
        CANARY,
        "--router-service",
        f"{SERVICE}:http",
        "--state-dir",
        "states",
        "-o",
        "json",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    status = json.loads(out)
    assert status["weight"] == 10
    stored = await run(FileStore(tmp_path / "states").load, "writer")
    assert stored.target.router_urls == [ROUTER_SERVICE]
    assert [_weights(u, rkit.TOKEN) for u in (a, b)] == [{STABLE: 90, CANARY: 10}] * 2


def _router_spec(runtime_urls: list[str]) -> FleetSpec:
    raw = yaml.safe_load((ROOT / "tests" / "deploy" / "fleet.yaml").read_text())
    raw["serving"] = {**raw["serving"], "runtime": "lorafleet", "gpus": 0, "router": True}
    raw["canary"] = {"mode": "router", "handoff": "controller", "runtime_urls": runtime_urls}
    return FleetSpec.model_validate(raw)


async def test_the_deploy_step_defaults_to_the_services_ready_pods(api, admin_token) -> None:
    outcomes = [
        {
            "expert": "proposal-writer",
            "registered": True,
            "production_version": "v1",
            "adapter_version": "v2",
        }
    ]
    # The default replicas are the InferenceService's Services, on the runtime's port (8080)
    for service in ("marketplace-prod-predictor", "marketplace-prod-transformer"):
        body = _slice(service, 8080, [("10.0.0.1", False)], service=service)
        await run(DiscoveryV1Api(api).create_namespaced_endpoint_slice, NS, body)
    with pytest.raises(
        LorafleetError, match=f"^Service {NS}/marketplace-prod-predictor: no ready endpoints"
    ):
        await run(deploy_rollouts, _router_spec([]), outcomes, api)
    # Candidate loaded where runtime_urls say: then the router's default replicas are looked up
    loaded: list[str] = []

    class Runtime(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_PUT(self) -> None:
            loaded.append(self.path)
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Runtime)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        spec = _router_spec([f"http://127.0.0.1:{server.server_address[1]}"])
        with pytest.raises(
            LorafleetError, match=f"^Service {NS}/marketplace-prod-transformer: no ready endpoints"
        ):
            await run(deploy_rollouts, spec, outcomes, api)
    finally:
        server.shutdown()
        server.server_close()
    assert loaded == ["/admin/adapters/proposal-writer-v2"]


def test_the_controllers_role_may_list_endpointslices() -> None:
    raw = yaml.safe_load((ROOT / "tests" / "deploy" / "fleet.yaml").read_text())
    raw["canary"] = {"handoff": "controller"}
    [role] = [o for o in controller_objects(FleetSpec.model_validate(raw)) if o["kind"] == "Role"]
    rules = [r for r in role["rules"] if r["apiGroups"] == ["discovery.k8s.io"]]
    assert rules == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list"]}
    ]
