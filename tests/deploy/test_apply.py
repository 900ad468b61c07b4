"""``deploy apply`` against kmock's KubernetesEmulator.

kmock stands in for the Kubernetes API server: it keeps objects in memory and answers
the official client's REST calls (GET/POST/PATCH, 404 and 409) as a server would. It does
not run KServe's controller, so the test sets the InferenceService's status itself, as
the controller would once the predictor pods are ready.
"""

from __future__ import annotations

import asyncio

import pytest
from kubernetes.client import ApiClient, Configuration, CustomObjectsApi

from lorafleet.deploy.apply import apply_objects, object_path, wait_ready
from lorafleet.errors import LorafleetError

CRDS = (
    "serving.kserve.io/v1beta1/inferenceservices",
    "serving.kserve.io/v1alpha1/servingruntimes",
    "monitoring.coreos.com/v1/servicemonitors",
)


@pytest.fixture
def api(kmock):
    for resource in CRDS:
        kmock.resources[resource] = {}
    config = Configuration(host=str(kmock.url).rstrip("/"))
    with ApiClient(config) as client:
        yield client


def _isvc(objects):
    return next(o for o in objects if o["kind"] == "InferenceService")


def _set_ready(api, isvc, status: str, reason: str = "") -> None:
    condition = {"type": "Ready", "status": status, "reason": reason}
    CustomObjectsApi(api).patch_namespaced_custom_object_status(
        "serving.kserve.io",
        "v1beta1",
        isvc["metadata"]["namespace"],
        "inferenceservices",
        isvc["metadata"]["name"],
        {"status": {"conditions": [condition]}},
    )


async def test_apply_creates_then_is_idempotent_then_patches_changes(api, rendered):
    objects = rendered["aws"]
    first = await asyncio.to_thread(apply_objects, api, objects)
    assert [a.action for a in first] == ["created"] * len(objects)
    assert [(a.kind, a.name) for a in first] == [
        (o["kind"], o["metadata"]["name"]) for o in objects
    ]

    again = await asyncio.to_thread(apply_objects, api, objects)
    assert [a.action for a in again] == ["unchanged"] * len(objects)

    changed = [dict(o) for o in objects]
    isvc = _isvc(changed)
    isvc["spec"] = {
        **isvc["spec"],
        "predictor": {**isvc["spec"]["predictor"], "canaryTrafficPercent": 25},
    }
    third = await asyncio.to_thread(apply_objects, api, changed)
    assert {a.name: a.action for a in third if a.kind == "InferenceService"} == {
        "marketplace-prod": "configured"
    }
    assert sum(a.action == "configured" for a in third) == 1
    live = await asyncio.to_thread(
        api.call_api, object_path(isvc), "GET", response_type="object", _return_http_data_only=True
    )
    assert live["spec"]["predictor"]["canaryTrafficPercent"] == 25


async def test_wait_ready_returns_once_kserve_reports_ready(api, rendered):
    objects = rendered["onprem"]
    await asyncio.to_thread(apply_objects, api, objects)
    isvc = _isvc(objects)
    await asyncio.to_thread(_set_ready, api, isvc, "False", "PredictorNotReady")
    seen = []

    def poll(state: str) -> None:
        seen.append(state)
        if len(seen) == 2:  # the controller finishes while we wait
            _set_ready(api, isvc, "True")

    await asyncio.to_thread(wait_ready, api, isvc, 30, 0.01, poll)
    assert seen == ["Ready=False: PredictorNotReady"] * 2


async def test_wait_ready_times_out_with_the_last_reason(api, rendered):
    objects = rendered["gcp"]
    await asyncio.to_thread(apply_objects, api, objects)
    isvc = _isvc(objects)
    await asyncio.to_thread(_set_ready, api, isvc, "False", "RevisionMissing")
    with pytest.raises(
        LorafleetError,
        match=r"InferenceService/marketplace-prod: not ready after 0.05 s \(Ready=False: RevisionMissing\)",
    ):
        await asyncio.to_thread(wait_ready, api, isvc, 0.05, 0.01)


async def test_unknown_kind_is_refused_before_any_call(api):
    with pytest.raises(LorafleetError, match="cannot apply kind Deployment"):
        await asyncio.to_thread(
            apply_objects,
            api,
            [
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": {"name": "x", "namespace": "n"},
                }
            ],
        )
