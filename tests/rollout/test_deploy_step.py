"""The pipeline's deploy step (:func:`lorafleet.rollout.deploy.deploy_rollouts`) against kmock.

kmock's KubernetesEmulator stands in for the API server (official ``kubernetes`` client):
the step reads and merge-patches the InferenceService and keeps the rollout in a ConfigMap
there. kmock runs no KServe controller, so the test writes the revision names into the
InferenceService's status. Metrics come from the Prometheus-API-shaped server. The router
mode's deploy step runs in tests/rollout/test_e2e_canary.py, against a real runtime; here,
with vLLM, against the admin API at its HTTP boundary.
Production moves in the registry only when a rollout is promoted.
"""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from kubernetes.client import CustomObjectsApi

from lorafleet.fleet import FleetSpec
from lorafleet.registry import Registry
from lorafleet.rollout.controller import Controller
from lorafleet.rollout.deploy import deploy_rollouts, rollouts_markdown
from lorafleet.rollout.store import ConfigMapStore

ROOT = Path(__file__).resolve().parents[2]
NS, NAME = "lorafleet", "marketplace-prod"
OLD, NEW = "marketplace-prod-predictor-00001", "marketplace-prod-predictor-00002"
ARGS = [
    "--max-batch-size",
    "64",
    "--adapter",
    "proposal-writer=/mnt/models/adapters/proposal-writer/v1",
    "--adapter",
    "job-analyzer=/mnt/models/adapters/job-analyzer/v1",
]
OUTCOMES = [
    {
        "expert": "proposal-writer",
        "registered": True,
        "production_version": "v1",
        "adapter_version": "v2",
    },
    {
        "expert": "job-analyzer",
        "registered": False,
        "production_version": "v1",
        "adapter_version": None,
    },
]


def _spec(
    handoff: str, prometheus_url: str = "http://127.0.0.1:9", registry: Path | str | None = None
) -> FleetSpec:
    raw = yaml.safe_load((ROOT / "tests" / "deploy" / "fleet.yaml").read_text())
    raw["serving"] = {**raw["serving"], "runtime": "lorafleet", "gpus": 0}
    raw["canary"] = {
        "mode": "revision",
        "handoff": handoff,
        "steps": [10, 50, 100],
        "pause_seconds": 0,
        "drive_timeout_seconds": 60,
        "analysis": {
            "source": "prometheus",
            "prometheus_url": prometheus_url,
            "interval_seconds": 0.2,
            "min_requests": 5,
        },
    }
    if registry is not None:
        raw["registry"] = {"uri": str(registry)}
    return FleetSpec.model_validate(raw)


def _registry(root: Path) -> Registry:
    """A registry where proposal-writer has v1 (production) and the candidate v2, as the
    pipeline's register step leaves it when a canary follows."""
    adapter = root.parent / "adapter"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"\0")
    registry = Registry(root)
    for _ in range(2):
        registry.register("proposal-writer", adapter, {}, lambda v: v)
    registry.set_production("proposal-writer", "v1")
    return registry


def _create_isvc(api) -> None:
    body = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {"predictor": {"model": {"modelFormat": {"name": "lorafleet"}, "args": ARGS}}},
        "status": {
            "components": {
                "predictor": {
                    "latestCreatedRevision": NEW,
                    "latestReadyRevision": NEW,
                    "previousRolledoutRevision": OLD,
                }
            }
        },
    }
    CustomObjectsApi(api).create_namespaced_custom_object(
        "serving.kserve.io", "v1beta1", NS, "inferenceservices", body
    )


def _isvc(api) -> dict:
    return CustomObjectsApi(api).get_namespaced_custom_object(
        "serving.kserve.io", "v1beta1", NS, "inferenceservices", NAME
    )


def test_handoff_none_starts_nothing() -> None:
    result = deploy_rollouts(_spec("none"), OUTCOMES)  # no API needed: none is reached
    assert result["rollouts"] == []
    assert result["skipped"] == [
        {"expert": "proposal-writer", "version": "v2", "reason": "canary.handoff is none"}
    ]
    assert "proposal-writer v2: no rollout (canary.handoff is none)" in rollouts_markdown(result)


async def test_handoff_controller_moves_the_isvc_and_leaves_the_rollout_to_the_controller(
    k8s, tmp_path
) -> None:
    registry = _registry(tmp_path / "registry")
    await asyncio.to_thread(_create_isvc, k8s)
    spec = _spec("controller", registry=tmp_path / "registry")
    first = await asyncio.to_thread(deploy_rollouts, spec, OUTCOMES, k8s)
    live = await asyncio.to_thread(_isvc, k8s)
    predictor = live["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == 10
    assert "proposal-writer=/mnt/models/adapters/proposal-writer/v2" in predictor["model"]["args"]
    assert (
        "job-analyzer=/mnt/models/adapters/job-analyzer/v1" in predictor["model"]["args"]
    )  # not registered: stays
    [rollout] = first["rollouts"]
    assert (rollout["name"], rollout["phase"], rollout["weight"]) == (NAME, "Progressing", 10)
    assert rollout["experts"] == {"proposal-writer": {"from": "v1", "to": "v2"}}
    # Production stays until the controller promotes; the rollout carries what it moves
    assert rollout["registry"] == "production moves when the rollout is promoted"
    assert registry.production("proposal-writer")["version"] == "v1"
    # The step retried (KFP retries): the same rollout, nothing moved twice
    again = await asyncio.to_thread(deploy_rollouts, spec, OUTCOMES, k8s)
    state = await asyncio.to_thread(ConfigMapStore(k8s, NS).load, NAME)
    assert again["rollouts"][0]["phase"] == "Progressing" and len(state.history) == 1
    assert state.registry is not None and state.registry.uri == str(tmp_path / "registry")
    assert [m.model_dump() for m in state.registry.moves] == [
        {"expert": "proposal-writer", "previous": "v1", "candidate": "v2"}
    ]
    # When the controller promotes it (here an operator's `canary promote`), production moves
    promoted = await asyncio.to_thread(Controller(ConfigMapStore(k8s, NS), k8s).promote, NAME)
    assert promoted.settled and promoted.registry.outcome == "production moved: proposal-writer v2"
    assert registry.production("proposal-writer")["version"] == "v2"


async def test_handoff_drive_promotes_a_healthy_canary_and_then_production(
    k8s, prometheus, tmp_path
) -> None:
    registry = _registry(tmp_path / "registry")
    await asyncio.to_thread(_create_isvc, k8s)
    prometheus.set(OLD, requests=90, error_rate=0.0, p95_latency_ms=80)
    prometheus.set(NEW, requests=10, error_rate=0.0, p95_latency_ms=90)
    spec = _spec("drive", prometheus.url, tmp_path / "registry")
    result = await asyncio.to_thread(deploy_rollouts, spec, OUTCOMES, k8s, poll_s=0.05)
    [rollout] = result["rollouts"]
    assert (rollout["phase"], rollout["stable"], rollout["canary"]) == ("Promoted", "", "")
    assert rollout["registry"] == "production moved: proposal-writer v2"
    assert registry.production("proposal-writer")["version"] == "v2"
    assert "- marketplace-prod: production moved: proposal-writer v2" in rollouts_markdown(result)
    assert (
        rollout["last_decision"]["canary"]["version"] == NEW
    )  # from the InferenceService's status
    live = await asyncio.to_thread(_isvc, k8s)
    assert (
        live["spec"]["predictor"].get("canaryTrafficPercent") is None
    )  # KServe: all to the latest revision
    assert "| marketplace-prod | stable -> canary | Promoted | 100% |" in rollouts_markdown(result)


async def test_handoff_drive_rolls_back_and_leaves_production_alone(
    k8s, prometheus, tmp_path
) -> None:
    registry = _registry(tmp_path / "registry")
    await asyncio.to_thread(_create_isvc, k8s)
    prometheus.set(NEW, requests=10, error_rate=0.4, p95_latency_ms=90)
    spec = _spec("drive", prometheus.url, tmp_path / "registry")
    result = await asyncio.to_thread(deploy_rollouts, spec, OUTCOMES, k8s, poll_s=0.05)
    [rollout] = result["rollouts"]
    assert rollout["phase"] == "RolledBack"
    assert rollout["last_decision"]["reasons"][0] == "error rate 40.0% > max 1.0%"
    assert rollout["registry"] == "production unchanged (RolledBack): proposal-writer v1"
    assert registry.production("proposal-writer")["version"] == "v1"
    assert registry.pointer("proposal-writer")["previous"] is None  # never moved
    assert (await asyncio.to_thread(_isvc, k8s))["spec"]["predictor"]["canaryTrafficPercent"] == 0


async def test_a_promotion_the_registry_cannot_take_is_recorded_with_the_operators_step(
    k8s, prometheus, aws_env, unreachable_endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a registry in a store this step cannot reach
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", unreachable_endpoint)
    await asyncio.to_thread(_create_isvc, k8s)
    prometheus.set(OLD, requests=90, error_rate=0.0, p95_latency_ms=80)
    prometheus.set(NEW, requests=10, error_rate=0.0, p95_latency_ms=90)
    spec = _spec("drive", prometheus.url, "s3://lorafleet-test/registry")
    # When the canary is promoted
    result = await asyncio.to_thread(deploy_rollouts, spec, OUTCOMES, k8s, poll_s=0.05)
    # Then traffic moved, and the rollout says production did not and how to finish
    [rollout] = result["rollouts"]
    assert rollout["phase"] == "Promoted"
    assert rollout["registry"].startswith("production not moved: proposal-writer v2 (s3://")
    assert rollout["registry"].endswith(
        "; run `lorafleet registry promote --registry s3://lorafleet-test/registry proposal-writer v2`"
    )
    state = await asyncio.to_thread(ConfigMapStore(k8s, NS).load, NAME)
    assert state.settled and state.registry.outcome == rollout["registry"]


class _AdminAPI(BaseHTTPRequestHandler):
    """The predictor's admin API at the HTTP boundary (the vLLM front serves the runtime's):
    loads adapters, keeps routes, records every call."""

    calls: ClassVar[list[tuple[str, str, dict | None]]] = []
    routes: ClassVar[dict[str, dict]] = {}

    def log_message(self, *args) -> None:  # quiet
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.calls.append(("GET", self.path, None))
        route = self.routes.get(self.path.rsplit("/", 1)[-1])
        if route:
            self._answer(200, route)
        else:
            self._answer(404, {"error": {"message": "no such route"}})

    def do_PUT(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
        self.calls.append(("PUT", self.path, body))
        if self.path.startswith("/admin/routes/"):
            self.routes[self.path.rsplit("/", 1)[-1]] = body
        self._answer(200, body)


async def test_router_mode_with_vllm_loads_the_candidate_through_the_front(
    k8s, admin_token, tmp_path
) -> None:
    # Given a vLLM fleet in router mode (no router transformer: the front holds the routes)
    _registry(tmp_path / "registry")
    raw = yaml.safe_load((ROOT / "tests" / "deploy" / "fleet.yaml").read_text())
    assert raw["serving"]["runtime"] == "vllm"
    raw["serving"]["router"] = False
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AdminAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    front = f"http://127.0.0.1:{server.server_address[1]}"
    raw["canary"] = {
        "mode": "router",
        "handoff": "controller",
        "steps": [10, 50, 100],
        "runtime_urls": [front],
        "router_urls": [front],
    }
    raw["registry"] = {"uri": str(tmp_path / "registry")}
    try:
        # When the deploy step starts the canary
        result = await asyncio.to_thread(
            deploy_rollouts, FleetSpec.model_validate(raw), OUTCOMES, k8s
        )
    finally:
        server.shutdown()
        server.server_close()
    # Then the candidate was loaded on the front from the adapter store, as the runtime's is
    store = raw["serving"]["adapter_store"]
    assert _AdminAPI.calls[0] == (
        "PUT",
        "/admin/adapters/proposal-writer-v2",
        {"source": f"{store}/proposal-writer/v2"},
    )
    # and the route moved 10% to it
    weights = {t["adapter"]: t["weight"] for t in _AdminAPI.routes["proposal-writer"]["targets"]}
    assert weights == {"proposal-writer": 90, "proposal-writer-v2": 10}
    [rollout] = result["rollouts"]
    assert (rollout["name"], rollout["phase"], rollout["weight"]) == (
        "proposal-writer",
        "Progressing",
        10,
    )
