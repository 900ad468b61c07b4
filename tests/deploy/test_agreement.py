"""The three renderings (deploy render, kustomize, Helm) say the same thing per profile.

``lorafleet deploy render`` is the reference: the kustomize overlays must build to exactly
its objects, and the chart to its objects plus Helm's own labels and the ``helm test`` pod.
Each rendering is also validated (strict core schemas, kserve models) and snapshotted.
"""

from __future__ import annotations

import copy

import yaml

from lorafleet.deploy.render import dump_yaml
from lorafleet.deploy.validate import validate_manifests


def _by_key(objects: list[dict]) -> dict[tuple[str, str], dict]:
    keyed = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    assert len(keyed) == len(objects), "two objects share a kind and name"
    return keyed


def _canonical(obj: dict) -> dict:
    """Plain data with keys sorted, so YAML key order and flow style do not matter."""
    return yaml.safe_load(yaml.safe_dump(obj, sort_keys=True))


def test_kustomize_builds_exactly_what_deploy_render_renders(
    rendered, kustomize_rendered, profile, kit
):
    want, got = _by_key(rendered[profile]), _by_key(kustomize_rendered[profile])
    assert set(got) == set(want)
    for key, obj in want.items():
        assert _canonical(got[key]) == _canonical(obj), (
            f"kustomize {profile}: {key} differs from deploy render"
        )
    validate_manifests(kustomize_rendered[profile], f"kustomize {profile}")
    kit.check_golden(f"kustomize-{profile}.yaml", dump_yaml(kustomize_rendered[profile]))


def test_helm_renders_what_deploy_render_renders(rendered, helm_rendered, profile, kit):
    want, got = _by_key(rendered[profile]), _by_key(helm_rendered[profile])
    hooks = {
        k for k, o in got.items() if "helm.sh/hook" in (o["metadata"].get("annotations") or {})
    }
    assert hooks == {("Pod", "marketplace-prod-test-models")}
    assert set(got) - hooks == set(want)
    for key, obj in want.items():
        helm_obj = copy.deepcopy(got[key])
        labels = helm_obj["metadata"].pop("labels")
        assert obj["metadata"]["labels"].items() <= labels.items(), f"helm {profile}: {key} labels"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        reference = copy.deepcopy(obj)
        reference["metadata"].pop("labels")
        assert _canonical(helm_obj) == _canonical(reference), (
            f"helm {profile}: {key} differs from deploy render"
        )
    validate_manifests(helm_rendered[profile], f"helm {profile}")
    kit.check_golden(f"helm-{profile}.yaml", dump_yaml(helm_rendered[profile]))
