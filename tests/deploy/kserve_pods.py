"""The Pods KServe would create from rendered ServingRuntimes and InferenceServices.

Security scanners (checkov) and policy engines know Pods and Deployments but not KServe's
custom resources, so they would skip the containers that matter most. This projection
merges each predictor's model fields into its ServingRuntime's container, as KServe
does (ISVC args appended, ISVC resources, env and mounts on top), and turns each
transformer into its Pod, so the scanners see what will run.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["serving_pods"]

_MODEL_ONLY = {
    "modelFormat",
    "runtime",
    "storageUri",
    "storage",
    "protocolVersion",
    "runtimeVersion",
}
_POD_FIELDS = ("serviceAccountName", "securityContext", "nodeSelector", "tolerations", "affinity")


def _pod(
    isvc: dict, component: str, spec: dict, containers: list[dict], volumes: list[dict]
) -> dict:
    meta = isvc["metadata"]
    pod_spec: dict[str, Any] = {k: spec[k] for k in _POD_FIELDS if k in spec}
    pod_spec.update(containers=containers, automountServiceAccountToken=False)
    if volumes:
        pod_spec["volumes"] = volumes
    labels = {
        **meta.get("labels", {}),
        "serving.kserve.io/inferenceservice": meta["name"],
        "component": component,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{meta['name']}-{component}",
            "namespace": meta.get("namespace"),
            "labels": labels,
        },
        "spec": pod_spec,
    }


def serving_pods(objects: list[dict]) -> list[dict]:
    """One Pod per InferenceService component (predictor, transformer) in ``objects``.

    Args:
        objects: rendered manifests holding InferenceServices and their ServingRuntimes.

    Returns:
        Pod manifests named ``<isvc>-predictor`` / ``<isvc>-transformer``.

    Raises:
        KeyError: if a predictor names a ServingRuntime that is not in ``objects``.
    """
    runtimes = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServingRuntime"}
    pods = []
    for isvc in (o for o in objects if o["kind"] == "InferenceService"):
        predictor = isvc["spec"]["predictor"]
        model = predictor["model"]
        runtime = runtimes[model["runtime"]]["spec"]
        container = copy.deepcopy(runtime["containers"][0])
        for key, value in model.items():
            if key == "args":
                container["args"] = [*container.get("args", []), *value]
            elif key in ("env", "volumeMounts"):
                container[key] = [*container.get(key, []), *value]
            elif key not in _MODEL_ONLY:
                container[key] = value
        pods.append(_pod(isvc, "predictor", predictor, [container], runtime.get("volumes", [])))
        if transformer := isvc["spec"].get("transformer"):
            pods.append(
                _pod(
                    isvc,
                    "transformer",
                    transformer,
                    transformer["containers"],
                    transformer.get("volumes", []),
                )
            )
    return pods
