"""The Helm chart: lint per profile, and values.schema.json refusing bad values readably."""

from __future__ import annotations

import pytest
import yaml
from helm_python import Chart, HelmRenderError, HelmValuesError, lint

from lorafleet.deploy.render import TRAINING_ROLE, VLLM_CPU_IMAGE, render
from lorafleet.fleet import FleetSpec


@pytest.fixture(scope="module")
def chart(kit):
    return kit.ROOT / "helm" / "lorafleet"


def test_chart_lints_clean_for_every_profile(chart, profile):
    values = yaml.safe_load((chart / f"values-{profile}.yaml").read_text())
    result = lint(str(chart), values, strict=True)
    assert result["total_charts_linted"] == 1
    assert result["errors"] == []
    # only the informational "icon is recommended" remains (severity 1 = INFO)
    assert {m["severity"] for m in result["messages"]} <= {1}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"gpus": "one"}, "at '/gpus': got string, want integer"),
        ({"gpuz": 1}, "additional properties 'gpuz' not allowed"),
        (
            {"router": {"enabled": True, "replicas": 2}},
            "at '/router': additional properties 'replicas' not allowed",
        ),
        (
            {
                "images": {
                    "lorafleet": "ghcr.io/lorafleet/lorafleet-runtime:latest",
                    "vllm": "ghcr.io/lorafleet/lorafleet-vllm:0.1.0-vllm0.32.0",
                }
            },
            "at '/images/lorafleet'",
        ),
        ({"canaryTrafficPercent": 120}, "at '/canaryTrafficPercent'"),
        (
            {"training": {"rbac": True, "namespaces": ["ml"]}},
            "at '/training': additional properties 'namespaces' not allowed",
        ),
        ({"training": {"namespace": "ML_Training"}}, "at '/training/namespace'"),
        # KServe refuses an InferenceService name that starts with a digit; vLLM these ranks.
        ({"fleetName": "1st-fleet"}, "at '/fleetName'"),
        ({"maxLoraRank": 48}, "at '/maxLoraRank'"),
        ({"deploymentMode": "Raw"}, "at '/deploymentMode'"),
        ({"runtime": "lorafleet", "gpus": 2}, "at '/gpus': maximum: got 2, want 1"),
    ],
)
def test_schema_refuses_wrong_types_and_unknown_keys_readably(chart, values, message):
    with pytest.raises(HelmValuesError) as info:
        Chart.load(chart).render(values, name="lorafleet", namespace="lorafleet")
    text = str(info.value)
    assert message in text
    assert "Traceback" not in text and len(text.splitlines()) <= 4  # one line per problem


def test_vllm_without_gpus_runs_the_cpu_build_with_a_warning(chart):
    # Given runtime vllm on CPU nodes
    files = Chart.load(chart).render(
        {"runtime": "vllm", "gpus": 0}, name="lorafleet", namespace="lorafleet"
    )
    # Then the front runs on vLLM's CPU build, like deploy render's, without a GPU
    runtime = yaml.safe_load(files["lorafleet/templates/servingruntime.yaml"])
    assert runtime["spec"]["containers"][0]["image"] == VLLM_CPU_IMAGE
    model = yaml.safe_load(files["lorafleet/templates/inferenceservice.yaml"])["spec"]["predictor"][
        "model"
    ]
    assert "nvidia.com/gpu" not in model["resources"]["limits"]
    assert model["args"][model["args"].index("--kv-cache-memory-bytes") + 1] == "8G"
    # and the install notes warn in one line
    [warning] = [
        ln for ln in files["lorafleet/templates/NOTES.txt"].splitlines() if "WARNING" in ln
    ]
    assert "vLLM's CPU build" in warning
    gpu = Chart.load(chart).render({}, name="lorafleet", namespace="lorafleet")
    assert "WARNING" not in gpu["lorafleet/templates/NOTES.txt"]


@pytest.mark.parametrize(
    ("values", "rule"),
    [
        ({"canaryTrafficPercent": 10}, "only deploymentMode Serverless has revisions"),
        (
            {"autoscaling": {"scaleMetric": "concurrency"}},
            "deploymentMode RawDeployment scales only on cpu or memory",
        ),
    ],
)
def test_settings_raw_deployment_ignores_are_refused(chart, values, rule):
    with pytest.raises(HelmRenderError, match=rule):
        Chart.load(chart).render(values, name="lorafleet", namespace="lorafleet")


def test_serverless_renders_the_revision_canary_and_concurrency(chart):
    values = {
        "deploymentMode": "Serverless",
        "canaryTrafficPercent": 10,
        "autoscaling": {"scaleMetric": "concurrency", "scaleTarget": 8},
    }
    files = Chart.load(chart).render(values, name="lorafleet", namespace="lorafleet")
    isvc = yaml.safe_load(files["lorafleet/templates/inferenceservice.yaml"])
    assert isvc["metadata"]["annotations"] == {"serving.kserve.io/deploymentMode": "Knative"}
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 10


def test_helm_test_hook_lists_every_adapter(helm_rendered, kit):
    pods = {p: next(o for o in helm_rendered[p] if o["kind"] == "Pod") for p in kit.PROFILES}
    script = pods["onprem"]["spec"]["containers"][0]["args"][0]
    assert "/openai/v1/models" in script  # the lorafleet runtime's OpenAI API
    assert '["proposal-writer","job-analyzer"]' in script
    # the vLLM front serves the same OpenAI API as the runtime
    assert "/openai/v1/models" in pods["aws"]["spec"]["containers"][0]["args"][0]
    compile(script, "helm-test", "exec")  # the hook's Python is valid


def test_training_rbac_in_the_jobs_namespace_matches_deploy_render(chart, kit):
    # Given the onprem fleet with its trainjob expert's jobs moved to ml-training
    raw = kit.fleet_for("onprem").model_dump(by_alias=True)
    trainjob = [e for e in raw["experts"] if e["training"]["launcher"] == "trainjob"]
    assert len(trainjob) == 1
    trainjob[0]["training"]["cluster"]["namespace"] = "ml-training"
    want = [
        o
        for o in render(FleetSpec.model_validate(raw), "onprem", kit.ADAPTERS)
        if o["metadata"]["name"] == TRAINING_ROLE
    ]
    # When the chart renders training.rbac for that namespace
    values = {"training": {"rbac": True, "namespace": "ml-training"}}
    files = Chart.load(chart).render(values, name="lorafleet", namespace="lorafleet")
    got = [d for d in yaml.safe_load_all(files["lorafleet/templates/training-rbac.yaml"]) if d]
    # Then both grant the same: Role and RoleBinding in ml-training, subject in the release namespace
    assert [(o["kind"], o["metadata"]["namespace"]) for o in want] == [
        ("Role", "ml-training"),
        ("RoleBinding", "ml-training"),
    ]
    for helm_obj, reference in zip(got, want, strict=True):
        labels = helm_obj["metadata"].pop("labels")
        assert reference["metadata"].pop("labels").items() <= labels.items()
        assert helm_obj == reference
    assert want[1]["subjects"][0]["namespace"] == "lorafleet"
