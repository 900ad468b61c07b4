"""The offline validator catches what a real API server would refuse."""

from __future__ import annotations

import copy
import sys

import pytest

from lorafleet.deploy.validate import ManifestError, kserve_errors, validate_manifests


def _first(objects: list[dict], kind: str) -> dict:
    return copy.deepcopy(next(o for o in objects if o["kind"] == kind))


def test_unknown_field_in_an_inference_service_is_an_error(rendered):
    isvc = _first(rendered["aws"], "InferenceService")
    isvc["spec"]["predictor"]["model"]["storageUrl"] = "s3://typo"
    with pytest.raises(
        ManifestError,
        match=r"InferenceService/marketplace-prod: \.spec\.predictor\.model\.storageUrl: unknown field",
    ):
        validate_manifests([isvc], "test")


def test_wrong_type_deep_in_an_embedded_kubernetes_model_is_an_error(rendered):
    runtime = _first(rendered["aws"], "ServingRuntime")
    runtime["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    errors = kserve_errors(runtime, "V1alpha1ServingRuntime")
    assert errors == [".spec.containers[0].ports[0].containerPort: expected int, got str '8080'"]


def test_booleans_are_not_integers():
    assert kserve_errors(
        {"spec": {"predictor": {"minReplicas": True}}}, "V1beta1InferenceService"
    ) == [".spec.predictor.minReplicas: expected int, got bool True"]


def test_core_kinds_are_strict(rendered):
    pdb = _first(rendered["aws"], "PodDisruptionBudget")
    pdb["spec"]["maxUnavailble"] = 1
    with pytest.raises(
        ManifestError,
        match=r"PodDisruptionBudget/marketplace-prod-predictor: \.spec: .*'maxUnavailble' was unexpected",
    ):
        validate_manifests([pdb], "test")


def test_all_problems_are_reported_at_once(rendered):
    objects = copy.deepcopy(rendered["gcp"])
    for obj in objects:
        obj["metadata"]["labelz"] = {}
    with pytest.raises(ManifestError) as info:
        validate_manifests(objects, "test")
    # every object but the unchecked ServiceMonitor
    assert str(info.value).count("labelz") == len(objects) - 1


def test_without_kubernetes_validate_core_kinds_are_unchecked_with_a_note(
    rendered, monkeypatch
) -> None:
    # The images leave kubernetes-validate out (100+ MB of schemas): render still works there,
    # KServe kinds are still checked, and the report says what was not.
    monkeypatch.setitem(sys.modules, "kubernetes_validate", None)  # import now fails
    objects = rendered["aws"]
    report = validate_manifests(objects, "test")
    kserve = [o for o in objects if o["apiVersion"].startswith("serving.kserve.io/")]
    assert kserve and len(report.checked) == len(kserve)
    assert len(report.unchecked) == len(objects) - len(kserve)
    assert report.note and "pip install 'lorafleet[validate]'" in report.note
