"""What every lorafleet Kubernetes object shares, as typed ``kubernetes.client`` models.

The serving objects (:mod:`lorafleet.deploy.render`) and the rollout controller's
(:mod:`lorafleet.rollout.manifests`) are built from these: the same metadata and labels,
the same runtime image running as the same non-root user under the same restricted
security contexts, and the names and paths that one object refers to in another.
"""

from __future__ import annotations

from kubernetes import client as k8s

from lorafleet.fleet import FleetSpec

__all__ = [
    "ADAPTER_MOUNT",
    "KSERVE",
    "PIPELINE_SA",
    "PORT",
    "RUNTIME_IMAGE",
    "UID",
    "container_security_context",
    "object_meta",
    "pod_security_context",
]

# A fixed tag: the release pipeline may pin a digest on top (image@sha256:...).
RUNTIME_IMAGE = "ghcr.io/lorafleet/lorafleet-runtime:0.1.0"
UID = 10001  # the runtime image's user (lorafleet/serve/Dockerfile)
PORT = 8080  # the serving containers' HTTP port
ADAPTER_MOUNT = "/mnt/models/adapters"  # where the predictor sees the adapter store
PIPELINE_SA = "lorafleet-pipeline"
KSERVE = "serving.kserve.io"


def object_meta(
    spec: FleetSpec,
    name: str,
    component: str,
    annotations: dict[str, str] | None = None,
    namespace: str | None = None,
) -> k8s.V1ObjectMeta:
    """Metadata of one of the fleet's objects, with lorafleet's recommended labels.

    Args:
        spec: the fleet; its name is the ``app.kubernetes.io/instance`` label.
        name: the object's name.
        component: the ``app.kubernetes.io/component`` label (``inference``, ``rollout``, ...).
        annotations: the object's annotations, if any.
        namespace: default: the fleet's serving namespace.

    Returns:
        The metadata model.
    """
    return k8s.V1ObjectMeta(
        name=name,
        namespace=namespace or spec.serving.namespace,
        labels={
            "app.kubernetes.io/name": "lorafleet",
            "app.kubernetes.io/instance": spec.name,
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": "lorafleet",
        },
        annotations=annotations or None,
    )


def container_security_context() -> k8s.V1SecurityContext:
    """The restricted profile for a container of the runtime image: non-root, read-only
    root filesystem, no privilege escalation, no capabilities, the runtime's seccomp profile."""
    return k8s.V1SecurityContext(
        run_as_non_root=True,
        run_as_user=UID,
        run_as_group=UID,
        allow_privilege_escalation=False,
        read_only_root_filesystem=True,
        capabilities=k8s.V1Capabilities(drop=["ALL"]),
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )


def pod_security_context() -> k8s.V1PodSecurityContext:
    """A pod of the runtime image: non-root, volumes owned by its group, runtime seccomp."""
    return k8s.V1PodSecurityContext(
        run_as_non_root=True,
        fs_group=UID,
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )
