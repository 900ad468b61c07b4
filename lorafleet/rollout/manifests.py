"""The in-cluster rollout controller's objects, built from typed ``kubernetes.client`` models.

``lorafleet deploy render`` adds them when the spec's ``canary.handoff`` is ``controller``;
the Helm chart renders the same objects with ``rolloutController.enabled``
(tests/rollout/test_helm_controller.py keeps the two in step). The controller is one
replica of ``lorafleet rollout controller`` in the fleet's namespace: it reads and writes the
rollout ConfigMaps, patches InferenceServices (revision canaries), lists the EndpointSlices
of a router Service (its replicas) and calls each replica's admin API with the router's
admin token (adapter canaries). The pipeline's ServiceAccount is bound to the same Role,
so the pipeline's deploy step can start rollouts.
"""

from __future__ import annotations

from typing import Any

from kubernetes import client as k8s

from lorafleet.fleet import FleetSpec
from lorafleet.k8s_objects import (
    KSERVE,
    PIPELINE_SA,
    RUNTIME_IMAGE,
    container_security_context,
    object_meta,
    pod_security_context,
)

__all__ = ["CONTROLLER", "HEARTBEAT", "ROLLOUT_SA", "controller_objects", "rollout_rbac"]

ROLLOUT_SA = "lorafleet-rollout"
CONTROLLER = "lorafleet-rollout-controller"
# The controller touches this file after every round; the liveness probe checks its age.
HEARTBEAT = "/tmp/heartbeat"
HEARTBEAT_MAX_AGE_S = 120


def rollout_rbac(spec: FleetSpec, controller: bool) -> list[Any]:
    """Role and RoleBinding ``lorafleet-rollout`` (typed models): rollout states, revision
    canaries, router Services' EndpointSlices.

    Args:
        spec: the fleet.
        controller: bind the controller's ServiceAccount too; the pipeline's is always bound
            (its deploy step starts rollouts, and drives them with ``handoff: drive``).
    """
    namespace = spec.serving.namespace
    role = k8s.V1Role(
        api_version="rbac.authorization.k8s.io/v1",
        kind="Role",
        metadata=object_meta(spec, ROLLOUT_SA, "rollout"),
        rules=[
            # Rollout states: one ConfigMap per rollout; nothing is ever deleted.
            k8s.V1PolicyRule(
                api_groups=[""],
                resources=["configmaps"],
                verbs=["get", "list", "watch", "create", "update", "patch"],
            ),
            # Revision canaries: canaryTrafficPercent, and the revision names from the status.
            k8s.V1PolicyRule(
                api_groups=[KSERVE],
                resources=["inferenceservices"],
                verbs=["get", "list", "watch", "patch"],
            ),
            # Router canaries on a k8s:// Service: its ready endpoints are the router replicas.
            k8s.V1PolicyRule(
                api_groups=["discovery.k8s.io"], resources=["endpointslices"], verbs=["list"]
            ),
        ],
    )
    binding = k8s.V1RoleBinding(
        api_version="rbac.authorization.k8s.io/v1",
        kind="RoleBinding",
        metadata=object_meta(spec, ROLLOUT_SA, "rollout"),
        role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=ROLLOUT_SA),
        subjects=[
            *(
                [k8s.RbacV1Subject(kind="ServiceAccount", name=ROLLOUT_SA, namespace=namespace)]
                if controller
                else []
            ),
            # The pipeline's deploy step starts rollouts (and drives them with handoff: drive).
            k8s.RbacV1Subject(kind="ServiceAccount", name=PIPELINE_SA, namespace=namespace),
        ],
    )
    return [role, binding]


def controller_objects(spec: FleetSpec) -> list[dict[str, Any]]:
    """ServiceAccount, Role, RoleBinding, Deployment and NetworkPolicy of the rollout controller.

    Args:
        spec: the fleet (its name, serving namespace and router admin Secret).

    Returns:
        Plain manifests, in apply order.
    """
    namespace = spec.serving.namespace
    selector = {"app.kubernetes.io/instance": spec.name, "app.kubernetes.io/component": "rollout"}
    role, binding = rollout_rbac(spec, controller=True)
    probe = f"import os, sys, time; sys.exit(time.time() - os.path.getmtime('{HEARTBEAT}') > {HEARTBEAT_MAX_AGE_S})"
    container = k8s.V1Container(
        name="controller",
        image=RUNTIME_IMAGE,
        command=[
            "lorafleet",
            "rollout",
            "controller",
            "--namespace",
            namespace,
            "--heartbeat",
            HEARTBEAT,
        ],
        env=[
            k8s.V1EnvVar(
                name="LORAFLEET_ADMIN_TOKEN",
                value_from=k8s.V1EnvVarSource(
                    secret_key_ref=k8s.V1SecretKeySelector(
                        name=f"{spec.name}-router-admin", key="token", optional=True
                    )
                ),
            ),
            k8s.V1EnvVar(name="LORAFLEET_LOG", value="INFO"),
        ],
        resources=k8s.V1ResourceRequirements(
            requests={"cpu": "50m", "memory": "128Mi"}, limits={"cpu": "500m", "memory": "256Mi"}
        ),
        security_context=container_security_context(),
        # Ready once it went round every rollout; alive while it keeps going round.
        readiness_probe=k8s.V1Probe(
            _exec=k8s.V1ExecAction(command=["python", "-c", probe]),
            period_seconds=10,
            timeout_seconds=5,
            failure_threshold=3,
        ),
        liveness_probe=k8s.V1Probe(
            _exec=k8s.V1ExecAction(command=["python", "-c", probe]),
            initial_delay_seconds=30,
            period_seconds=30,
            timeout_seconds=5,
            failure_threshold=3,
        ),
        volume_mounts=[k8s.V1VolumeMount(name="tmp", mount_path="/tmp")],
    )
    deployment = k8s.V1Deployment(
        api_version="apps/v1",
        kind="Deployment",
        metadata=object_meta(spec, CONTROLLER, "rollout"),
        spec=k8s.V1DeploymentSpec(
            # One controller: the stores compare-and-swap, but one writer keeps the history tidy.
            replicas=1,
            strategy=k8s.V1DeploymentStrategy(type="Recreate"),
            selector=k8s.V1LabelSelector(match_labels=selector),
            template=k8s.V1PodTemplateSpec(
                metadata=k8s.V1ObjectMeta(labels=selector),
                spec=k8s.V1PodSpec(
                    service_account_name=ROLLOUT_SA,
                    automount_service_account_token=True,  # it talks to the API server
                    security_context=pod_security_context(),
                    containers=[container],
                    volumes=[k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource())],
                ),
            ),
        ),
    )
    # The controller only calls out (API server, routers, Prometheus): nothing may call in.
    no_ingress = k8s.V1NetworkPolicy(
        api_version="networking.k8s.io/v1",
        kind="NetworkPolicy",
        metadata=object_meta(spec, CONTROLLER, "rollout"),
        spec=k8s.V1NetworkPolicySpec(
            pod_selector=k8s.V1LabelSelector(match_labels=selector), policy_types=["Ingress"]
        ),
    )
    account = k8s.V1ServiceAccount(
        api_version="v1", kind="ServiceAccount", metadata=object_meta(spec, ROLLOUT_SA, "rollout")
    )
    return k8s.ApiClient().sanitize_for_serialization(
        [account, role, binding, deployment, no_ingress]
    )
