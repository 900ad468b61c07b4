"""Serving settings a cluster would refuse or silently ignore are refused in the spec."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lorafleet.deploy.render import render, serving_problems
from lorafleet.fleet import FleetSpec

REVISION = {
    "mode": "revision",
    "analysis": {"source": "prometheus", "prometheus_url": "http://prometheus.monitoring:9090"},
}


def _spec(kit, profile: str = "aws", name: str | None = None, canary=None, **serving) -> FleetSpec:
    raw = kit.fleet_for(profile).model_dump(by_alias=True)
    raw["serving"].update(serving)
    if name:
        raw["name"] = name
    if canary:
        raw["canary"] = {**raw["canary"], **canary}
    return FleetSpec.model_validate(raw)


@pytest.mark.parametrize(
    ("serving", "message"),
    [
        (
            {"max_lora_rank": 48},
            "max_lora_rank 48: vLLM accepts only 1, 8, 16, 32, 64, 128, 256, 320, 512",
        ),
        (
            {"autoscaling": {"scale_metric": "concurrency", "scale_target": 8}},
            "deployment_mode RawDeployment scales only on cpu or memory",
        ),
        ({"canary_traffic_percent": 10}, "only KServe's Serverless mode has revisions"),
        ({"autoscaling": {"scale_metric": "cpu", "scale_target": 150}}, "a percentage (1-100)"),
        # A pod holding GPUs the native runtime would never use.
        (
            {"runtime": "lorafleet", "gpus": 2},
            "gpus 2: the lorafleet runtime serves on one device; a base that needs several "
            "GPUs is served with runtime: vllm (tensor parallelism over gpus)",
        ),
    ],
)
def test_what_kserve_or_vllm_refuse_or_ignore_is_refused(kit, serving, message) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _spec(kit, **serving)


def test_serverless_renders_the_revision_canary_with_knative_autoscaling(kit) -> None:
    spec = _spec(
        kit,
        deployment_mode="Serverless",
        canary_traffic_percent=10,
        autoscaling={"scale_metric": "concurrency", "scale_target": 8},
    )
    isvc = next(o for o in render(spec, "aws", kit.ADAPTERS) if o["kind"] == "InferenceService")
    assert isvc["metadata"]["annotations"] == {"serving.kserve.io/deploymentMode": "Knative"}
    predictor = isvc["spec"]["predictor"]
    assert (predictor["canaryTrafficPercent"], predictor["scaleMetric"]) == (10, "concurrency")


def test_raw_deployment_renders_an_hpa_on_cpu(kit) -> None:
    isvc = next(
        o for o in render(_spec(kit), "aws", kit.ADAPTERS) if o["kind"] == "InferenceService"
    )
    assert isvc["metadata"]["annotations"] == {
        "serving.kserve.io/deploymentMode": "Standard",
        "serving.kserve.io/autoscalerClass": "hpa",
    }
    assert (isvc["spec"]["predictor"]["scaleMetric"], isvc["spec"]["predictor"]["scaleTarget"]) == (
        "cpu",
        80,
    )
    assert "name" not in isvc["spec"]["predictor"]["model"]


def test_a_fleet_name_kserve_refuses_is_one_named_field(kit) -> None:
    problems = serving_problems(_spec(kit, name="1st-fleet"), "aws")
    assert [field for field, _ in problems] == ["name"]
    assert "starting with a letter" in problems[0][1]


def test_a_revision_canary_needs_serverless(kit) -> None:
    spec = _spec(kit, canary=REVISION)
    assert [f for f, _ in serving_problems(spec, "aws")] == ["canary.mode"]
    serverless = _spec(
        kit,
        deployment_mode="Serverless",
        autoscaling={"scale_metric": "concurrency", "scale_target": 8},
        canary=REVISION,
    )
    assert serving_problems(serverless, "aws") == []
