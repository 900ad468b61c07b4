"""The canary drill, end to end on loopback (``make e2e-canary``; also part of ``make test``).

The real lorafleet runtime serves two versions of one adapter on the tiny base
(``writer-v1``, stable, and ``writer-v2``, the canary: the two session adapters of
tests/conftest.py under version names), the real router proxy sits in front of it with the
route ``writer``, and a bounded real HTTP load generator sends chat completions through the
router the whole time. The controller moves the route's weights through the router's
admin API and measures from the router's ``/metrics``. Faults are set on the canary only,
through the runtime's documented drill option (``/admin/faults``):

1. healthy canary: promoted to 100% through every step;
2. the canary answers 5xx to 30% of its requests: rolled back within two analyses;
3. the canary adds 500 ms of latency: rolled back on p95 within two analyses.

In every scenario no request served by the stable version fails. Each prints one JSON line.
Last, the pipeline's deploy step (``canary.handoff: drive``) loads a new version from an
adapter store onto the runtime and drives its rollout to promotion on the same stack; its
rollout state is a ConfigMap in kmock's KubernetesEmulator (official ``kubernetes`` client).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lorafleet.fleet import CanaryPolicy, FleetSpec
from lorafleet.rollout.controller import Controller
from lorafleet.rollout.loadgen import LoadGenerator
from lorafleet.rollout.state import Target
from lorafleet.rollout.store import FileStore
from lorafleet.serve.runtime import run_server_subprocess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STABLE, CANARY, ROUTE = "writer-v1", "writer-v2", "writer"
INTERVAL_S = 1.0
# Short intervals and three steps keep a scenario to seconds; the thresholds sit far from
# the tiny model's healthy numbers (p95 well under 100 ms here) and from the faults.
POLICY = CanaryPolicy.model_validate(
    {
        "steps": [20, 50, 100],
        "pause_seconds": 2,
        "max_error_rate": 0.05,
        "max_p95_latency_ms": 450,
        "failure_limit": 1,
        "inconclusive_limit": 3,
        "analysis": {"interval_seconds": INTERVAL_S, "min_requests": 5},
    }
)


@pytest.fixture(scope="module")
def stack(tiny_base: Path, tiny_adapters: dict[str, Path], rkit) -> Iterator[dict[str, str]]:
    """Runtime (two versions of the writer adapter) and router, both on 127.0.0.1."""
    adapters = {STABLE: tiny_adapters["proposal-writer"], CANARY: tiny_adapters["job-analyzer"]}
    env = {"LORAFLEET_ADMIN_TOKEN": rkit.TOKEN}
    with run_server_subprocess(
        tiny_base, adapters, env=env, extra_args=["--max-batch-size", "16"]
    ) as runtime:
        stable_only = {"targets": [{"adapter": STABLE, "weight": 100}]}
        with rkit.run_router(
            runtime, {ROUTE: stable_only}, ready_path="/v2/health/ready"
        ) as router:
            yield {"runtime": runtime, "router": router}


def _admin(url: str, method: str, path: str, body: dict | None = None) -> httpx.Response:
    import os

    headers = {"authorization": f"Bearer {os.environ['LORAFLEET_ADMIN_TOKEN']}"}
    response = httpx.request(method, url + path, json=body, headers=headers, timeout=10)
    assert response.status_code in (200, 404), response.text
    return response


def _drill(stack: dict[str, str], tmp_path: Path, scenario: str, fault: dict | None) -> dict:
    """Run one canary under load; returns the scenario's JSON line (also printed)."""
    runtime, router = stack["runtime"], stack["router"]
    # Given: all traffic on the stable version, and the canary's fault (if any) in place
    _admin(
        router, "PUT", f"/admin/routes/{ROUTE}", {"targets": [{"adapter": STABLE, "weight": 100}]}
    )
    if fault:
        _admin(runtime, "PUT", f"/admin/faults/{CANARY}", fault)
    else:
        _admin(runtime, "DELETE", f"/admin/faults/{CANARY}")
    controller = Controller(FileStore(tmp_path / "rollouts"))
    target = Target(route=ROUTE, stable=STABLE, canary=CANARY, router_urls=[router])
    load = LoadGenerator(router, ROUTE, concurrency=6, max_requests=20_000, max_seconds=90).start()
    try:
        time.sleep(0.5)  # traffic is flowing before the canary starts
        # When the rollout starts and the controller drives it to a decision
        controller.start(scenario, target, POLICY)
        final = controller.drive(scenario, timeout_s=60)
    finally:
        outcomes = load.stop()
        _admin(runtime, "DELETE", f"/admin/faults/{CANARY}")
    analyses = [d for d in final.history if d.verdict != "Manual"]
    decided = next(d for d in final.history if d.action in ("promote", "rollback", "abort"))
    weights = []
    for d in final.history:
        if d.weight not in weights:
            weights.append(d.weight)
    if final.phase == "Promoted":
        weights.append(100)
    stable_failed = [o for o in outcomes if o.adapter == STABLE and o.status != 200]
    line = {
        "scenario": scenario,
        "outcome": final.phase,
        "steps": weights,
        "analyses": len(analyses),
        "time_to_decision_s": round(decided.at - final.started_at, 2),
        "decision": {"verdict": decided.verdict, "reasons": decided.reasons},
        "requests": load.summary(),
        "stable_failures": len(stable_failed),
    }
    print(f"\n{json.dumps(line)}", flush=True)  # own line, after pytest's progress dots
    # Then: the stable version never failed, whatever the canary did
    assert outcomes and any(o.adapter == STABLE for o in outcomes)
    assert stable_failed == []
    assert all(o.status != 0 for o in outcomes), "every request got an answer"
    route = _admin(router, "GET", f"/admin/routes/{ROUTE}").json()
    line["route_after"] = {t["adapter"]: t["weight"] for t in route["targets"]}
    return line


def test_healthy_canary_is_promoted_to_100(stack, admin_token, tmp_path: Path) -> None:
    line = _drill(stack, tmp_path, "healthy", None)
    assert line["outcome"] == "Promoted"
    assert line["steps"] == [20, 50, 100]
    assert line["route_after"] == {CANARY: 100}
    assert line["requests"][CANARY].get("200", 0) > 0


def test_canary_with_30_percent_5xx_is_rolled_back_within_two_intervals(
    stack, admin_token, tmp_path: Path
) -> None:
    line = _drill(stack, tmp_path, "errors-30pct", {"error_rate": 0.3})
    assert line["outcome"] == "RolledBack"
    assert line["analyses"] <= 2
    assert line["decision"]["verdict"] == "Failed"
    assert any(r.startswith("error rate") and ">" in r for r in line["decision"]["reasons"])
    assert line["route_after"] == {STABLE: 100}
    assert line["requests"][CANARY].get("500", 0) > 0  # the fault really fired


def test_canary_with_500ms_latency_is_rolled_back_on_p95(
    stack, admin_token, tmp_path: Path
) -> None:
    line = _drill(stack, tmp_path, "latency-500ms", {"added_latency_ms": 500})
    assert line["outcome"] == "RolledBack"
    assert line["analyses"] <= 2
    assert any(r.startswith("p95") and ">" in r for r in line["decision"]["reasons"])
    assert line["route_after"] == {STABLE: 100}


async def test_deploy_step_loads_the_candidate_and_drives_its_rollout(
    stack, admin_token, k8s, tiny_adapters, tmp_path
) -> None:
    from lorafleet.rollout.deploy import deploy_rollouts

    runtime, router = stack["runtime"], stack["router"]
    # Given: the expert "writer" serving its production version under its own name, and v9 in the store
    await asyncio.to_thread(
        _admin,
        runtime,
        "PUT",
        "/admin/adapters/writer",
        {"source": str(tiny_adapters["proposal-writer"])},
    )
    await asyncio.to_thread(
        _admin,
        router,
        "PUT",
        f"/admin/routes/{ROUTE}",
        {"targets": [{"adapter": STABLE, "weight": 100}]},
    )
    shutil.copytree(tiny_adapters["job-analyzer"], tmp_path / "store" / "writer" / "v9")
    spec = FleetSpec.model_validate(
        {
            "name": "drill",
            "experts": [
                {
                    "name": "writer",
                    "task": "proposal-writer",
                    "seed_data": "s.jsonl",
                    "eval_data": "e.jsonl",
                }
            ],
            "serving": {"adapter_store": str(tmp_path / "store"), "namespace": "drill"},
            "canary": {
                **POLICY.model_dump(),
                "handoff": "drive",
                "drive_timeout_seconds": 60,
                "router_urls": [router],
                "runtime_urls": [runtime],
            },
        }
    )
    outcomes = [
        {
            "expert": "writer",
            "registered": True,
            "production_version": "v8",
            "adapter_version": "v9",
        }
    ]
    load = LoadGenerator(router, "writer", concurrency=6, max_seconds=90).start()
    try:
        result = await asyncio.to_thread(deploy_rollouts, spec, outcomes, k8s, poll_s=0.2)
    finally:
        outcomes_seen = load.stop()
    [rollout] = result["rollouts"]
    print(
        "\n"
        + json.dumps(
            {
                "scenario": "deploy-step-drive",
                "outcome": rollout["phase"],
                "steps": rollout["steps"],
                "time_to_decision_s": rollout["time_to_decision_s"],
                "requests": load.summary(),
            }
        ),
        flush=True,
    )
    assert (rollout["phase"], rollout["stable"], rollout["canary"]) == (
        "Promoted",
        "writer",
        "writer-v9",
    )
    assert {o.adapter for o in outcomes_seen if o.status == 200} >= {"writer", "writer-v9"}
    assert [o for o in outcomes_seen if o.adapter == "writer" and o.status != 200] == []
    route = (await asyncio.to_thread(_admin, router, "GET", "/admin/routes/writer")).json()
    assert route["targets"] == [{"adapter": "writer-v9", "weight": 100.0}]
    listed = (await asyncio.to_thread(_admin, runtime, "GET", "/admin/adapters")).json()["adapters"]
    assert "writer-v9" in {a["name"] for a in listed}
