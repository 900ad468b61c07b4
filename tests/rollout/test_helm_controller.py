"""The rollout controller in the Helm chart and in ``lorafleet deploy render``: the same objects.

The chart is rendered offline (helm-python-sdk) with ``rolloutController.enabled``; the
reference is :func:`lorafleet.rollout.manifests.controller_objects`, which
``deploy render`` adds for ``canary.handoff: controller``. Both are validated against the
Kubernetes schemas (strict) and the chart's rendering is a golden file
(``goldens/helm-rollout-controller.yaml``, rewritten only with ``UPDATE_GOLDENS=1``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml
from helm_python import Chart, HelmValuesError, lint

from lorafleet.deploy.render import dump_yaml, render
from lorafleet.deploy.validate import validate_manifests
from lorafleet.fleet import FleetSpec
from lorafleet.io import atomic_write_text
from lorafleet.rollout.manifests import controller_objects

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "lorafleet"
GOLDEN = Path(__file__).parent / "goldens" / "helm-rollout-controller.yaml"


def _spec(handoff: str) -> FleetSpec:
    raw = yaml.safe_load((ROOT / "tests" / "deploy" / "fleet.yaml").read_text())
    raw["canary"] = {"handoff": handoff}
    return FleetSpec.model_validate(raw)


def _helm(enabled: bool, pipeline_rbac: bool = False) -> list[dict]:
    values = yaml.safe_load((CHART / "values-aws.yaml").read_text())
    values["rolloutController"] = {"enabled": enabled, "pipelineRbac": pipeline_rbac}
    files = Chart.load(CHART).render(values, name="lorafleet", namespace="lorafleet")
    return [
        d
        for path in sorted(files)
        if path.endswith(".yaml")
        for d in yaml.safe_load_all(files[path])
        if d
    ]


def _canonical(obj: dict) -> dict:
    return yaml.safe_load(yaml.safe_dump(obj, sort_keys=True))


def test_chart_renders_what_deploy_render_renders() -> None:
    want = {(o["kind"], o["metadata"]["name"]): o for o in controller_objects(_spec("controller"))}
    helm = [
        o
        for o in _helm(True)
        if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "rollout"
    ]
    got = {(o["kind"], o["metadata"]["name"]): o for o in helm}
    assert (
        set(got)
        == set(want)
        == {
            ("ServiceAccount", "lorafleet-rollout"),
            ("Role", "lorafleet-rollout"),
            ("RoleBinding", "lorafleet-rollout"),
            ("Deployment", "lorafleet-rollout-controller"),
            ("NetworkPolicy", "lorafleet-rollout-controller"),
        }
    )
    for key, obj in want.items():
        helm_obj = copy.deepcopy(got[key])
        labels = helm_obj["metadata"].pop("labels")
        assert obj["metadata"]["labels"].items() <= labels.items(), key
        reference = copy.deepcopy(obj)
        reference["metadata"].pop("labels")
        assert _canonical(helm_obj) == _canonical(reference), (
            f"helm {key} differs from deploy render"
        )
    validate_manifests(helm, "helm rollout controller")
    text = dump_yaml(helm)
    if os.environ.get("UPDATE_GOLDENS") == "1":
        atomic_write_text(GOLDEN, text)
    assert GOLDEN.is_file(), f"no golden {GOLDEN}: run with UPDATE_GOLDENS=1 once and review it"
    assert text == GOLDEN.read_text(), (
        "the controller's rendering changed; rerun with UPDATE_GOLDENS=1 if intended"
    )


def test_controller_runs_the_cli_with_least_privilege() -> None:
    objects = {o["kind"]: o for o in controller_objects(_spec("controller"))}
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][:5] == [
        "lorafleet",
        "rollout",
        "controller",
        "--namespace",
        "lorafleet",
    ]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert (
        container["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "marketplace-prod-router-admin"
    )
    verbs = {v for rule in objects["Role"]["rules"] for v in rule["verbs"]}
    assert "delete" not in verbs and "*" not in verbs
    subjects = {s["name"] for s in objects["RoleBinding"]["subjects"]}
    assert subjects == {"lorafleet-rollout", "lorafleet-pipeline"}


def test_deploy_render_adds_the_controller_only_for_handoff_controller() -> None:
    adapters = {"proposal-writer": "v2", "job-analyzer": "v1"}
    kinds = lambda objs: [(o["kind"], o["metadata"]["name"]) for o in objs]  # noqa: E731
    plain = render(_spec("none"), "aws", adapters)
    with_controller = render(_spec("controller"), "aws", adapters)
    assert kinds(with_controller) == kinds(plain) + kinds(controller_objects(_spec("controller")))
    validate_manifests(with_controller, "deploy render with the rollout controller")
    assert not [
        o
        for o in _helm(False)
        if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "rollout"
    ]


def test_handoff_drive_grants_the_pipeline_the_rollout_role_without_a_controller() -> None:
    """With ``handoff: drive`` the pipeline's deploy step keeps the rollout's ConfigMap and
    finds router replicas itself: deploy render adds the rollout Role bound to the pipeline's
    ServiceAccount alone, and the chart's ``rolloutController.pipelineRbac`` the same objects."""
    adapters = {"proposal-writer": "v2", "job-analyzer": "v1"}
    plain = render(_spec("none"), "aws", adapters)
    drive = render(_spec("drive"), "aws", adapters)
    extra = drive[len(plain) :]
    assert drive[: len(plain)] == plain
    assert [(o["kind"], o["metadata"]["name"]) for o in extra] == [
        ("Role", "lorafleet-rollout"),
        ("RoleBinding", "lorafleet-rollout"),
    ]
    role, binding = extra
    assert [s["name"] for s in binding["subjects"]] == ["lorafleet-pipeline"]
    granted = {
        (r["apiGroups"][0], res, v)
        for r in role["rules"]
        for res in r["resources"]
        for v in r["verbs"]
    }
    assert {
        ("", "configmaps", "create"),
        ("", "configmaps", "update"),
        ("discovery.k8s.io", "endpointslices", "list"),
    } <= granted
    validate_manifests(drive, "deploy render, handoff drive")
    helm = [
        o
        for o in _helm(False, pipeline_rbac=True)
        if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "rollout"
    ]
    assert len(helm) == 2
    for want, got in zip(extra, helm, strict=True):
        got, want = copy.deepcopy(got), copy.deepcopy(want)
        assert want["metadata"].pop("labels").items() <= got["metadata"].pop("labels").items()
        assert _canonical(got) == _canonical(want)


def test_chart_lints_with_the_controller_and_refuses_unknown_keys() -> None:
    values = yaml.safe_load((CHART / "values-aws.yaml").read_text())
    result = lint(str(CHART), {**values, "rolloutController": {"enabled": True}}, strict=True)
    assert result["errors"] == []
    with pytest.raises(
        HelmValuesError,
        match="at '/rolloutController': additional properties 'replicas' not allowed",
    ):
        Chart.load(CHART).render(
            {"rolloutController": {"enabled": True, "replicas": 2}},
            name="lorafleet",
            namespace="lorafleet",
        )


@pytest.mark.integration
def test_controller_passes_checkov(tmp_path: Path) -> None:
    """checkov's Kubernetes checks with the deploy tests' settings, plus one justified skip:
    CKV_K8S_38 (no service-account token unless needed): the controller needs its token, it
    calls the API server for the rollout ConfigMaps and InferenceServices."""
    import json
    import subprocess

    (tmp_path / "controller.yaml").write_text(GOLDEN.read_text())
    config = ROOT / "tests" / "deploy" / "checkov.yaml"
    skips = [
        *yaml.safe_load(config.read_text())["skip-check"],
        "CKV_K8S_38",
    ]  # --skip-check replaces the file's
    done = subprocess.run(
        [
            str(ROOT / "ci" / "checkov.sh"),
            "-d",
            str(tmp_path),
            "--config-file",
            str(config),
            "--skip-check",
            ",".join(skips),
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode in (0, 1), done.stderr[-2000:]
    reports = json.loads(done.stdout)
    k8s = next(
        r
        for r in (reports if isinstance(reports, list) else [reports])
        if r.get("check_type") == "kubernetes"
    )
    assert [(f["check_id"], f["resource"]) for f in k8s["results"]["failed_checks"]] == []
    passed = {c["check_id"] for c in k8s["results"]["passed_checks"]}
    # non-root, no privilege escalation, read-only root fs, resources, probes, seccomp
    assert {
        "CKV_K8S_23",
        "CKV_K8S_20",
        "CKV_K8S_22",
        "CKV_K8S_11",
        "CKV_K8S_13",
        "CKV_K8S_8",
        "CKV_K8S_9",
        "CKV_K8S_31",
    } <= passed
