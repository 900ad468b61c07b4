"""Security review: checkov's Kubernetes and secrets checks over everything rendered.

checkov runs from its own tool environment (``ci/checkov.sh`` creates ``.venv-tools`` on
first use): its pinned dependencies clash with the project's. The only skips are the
justified ones in tests/deploy/checkov.yaml and the helm test pod's annotations.
checkov does not know KServe's custom resources, so the Pods KServe would create from
them (`kserve_pods.serving_pods` beside this test) are scanned too.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from lorafleet.deploy.render import dump_yaml

from .kserve_pods import serving_pods

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def checkov(kit):
    script = kit.ROOT / "ci" / "checkov.sh"
    subprocess.run([str(script), "--version"], check=True, capture_output=True, timeout=600)

    def run(folder) -> dict:
        done = subprocess.run(
            [
                str(script),
                "-d",
                str(folder),
                "--config-file",
                str(kit.ROOT / "tests/deploy/checkov.yaml"),
                "-o",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode in (0, 1), done.stderr[-2000:]
        reports = json.loads(done.stdout)
        reports = reports if isinstance(reports, list) else [reports]
        return {r["check_type"]: r for r in reports if "check_type" in r}

    return run


def test_everything_rendered_passes_checkov(
    checkov, rendered, kustomize_rendered, helm_rendered, tmp_path, kit
):
    for p in kit.PROFILES:
        (tmp_path / f"render-{p}.yaml").write_text(dump_yaml(rendered[p]))
        (tmp_path / f"kustomize-{p}.yaml").write_text(dump_yaml(kustomize_rendered[p]))
        (tmp_path / f"helm-{p}.yaml").write_text(dump_yaml(helm_rendered[p]))
        (tmp_path / f"pods-{p}.yaml").write_text(dump_yaml(serving_pods(rendered[p])))
    for values in (kit.ROOT / "helm" / "lorafleet").glob("values*.yaml"):
        (tmp_path / values.name).write_text(values.read_text())
    k8s = checkov(tmp_path)["kubernetes"]
    failed = [
        (f["check_id"], f["resource"], f["file_path"]) for f in k8s["results"]["failed_checks"]
    ]
    assert failed == []
    scanned = {c["resource"] for c in k8s["results"]["passed_checks"]}
    # the serving containers themselves were checked, not only RBAC and policies
    assert {
        "Pod.lorafleet.marketplace-prod-predictor",
        "Pod.lorafleet.marketplace-prod-transformer",
    } <= scanned
    passed_ids = {c["check_id"] for c in k8s["results"]["passed_checks"]}
    # non-root, no privilege escalation, read-only root fs, resources, no :latest, seccomp
    assert {
        "CKV_K8S_23",
        "CKV_K8S_20",
        "CKV_K8S_22",
        "CKV_K8S_11",
        "CKV_K8S_13",
        "CKV_K8S_14",
        "CKV_K8S_31",
    } <= passed_ids


def test_checkov_catches_a_root_container_and_a_leaked_key(checkov, rendered, tmp_path):
    # Given a predictor pod turned privileged and a values file holding a real-looking key
    pod = serving_pods(rendered["onprem"])[0]
    pod["spec"]["containers"][0]["securityContext"].update(
        privileged=True, allowPrivilegeEscalation=True
    )
    pod["spec"]["containers"][0]["image"] = "ghcr.io/lorafleet/lorafleet-runtime:latest"
    (tmp_path / "pod.yaml").write_text(dump_yaml([pod]))
    (tmp_path / "values-leak.yaml").write_text(
        "storage:\n  awsAccessKeyId: AKIAIOSFODNN7EXAMPLE\n  awsSecretAccessKey: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
    )
    # When checkov scans them, Then each problem is reported
    reports = checkov(tmp_path)
    k8s_failed = {f["check_id"] for f in reports["kubernetes"]["results"]["failed_checks"]}
    assert {
        "CKV_K8S_16",
        "CKV_K8S_20",
        "CKV_K8S_14",
    } <= k8s_failed  # privileged, escalation, :latest
    assert reports["secrets"]["results"]["failed_checks"], "the leaked key was not found"
