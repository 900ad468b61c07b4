"""Cluster profiles: what differs between AWS, GCP, on-prem and local clusters.

A profile gives the GPU node labels and taints the serving pods tolerate, the storage URI
schemes it can read, and the ServiceAccount that carries the storage identity (IRSA on
AWS, Workload Identity on GCP, an S3 credentials Secret or a PVC on-prem). ``local`` is a
kind or minikube cluster on this machine: no storage identity, and local folders (the demo
registry, a built base) mounted from the node by ``hostPath``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.errors import LorafleetError
from lorafleet.fleet import ServingSpec

__all__ = ["PROFILES", "Profile", "identity_problem", "service_account_metadata"]


@dataclass(frozen=True)
class Profile:
    """Defaults of one cluster kind.

    Attributes:
        name: aws, gcp, onprem or local.
        schemes: storage URI schemes the serving pods can read on this profile.
        gpu_node_selector: labels of the GPU node pool (spec.serving.node_selector wins).
        gpu_tolerations: taints of the GPU node pool, as Toleration dicts.
        host_folders: local folders (absolute paths, ``file://``) are mounted from the node
            by ``hostPath``: a kind or minikube cluster that sees this machine's folders.
    """

    name: str
    schemes: tuple[str, ...]
    gpu_node_selector: dict[str, str]
    gpu_tolerations: tuple[dict[str, str], ...]
    host_folders: bool = False


# EKS GPU AMIs, GKE and the NVIDIA GPU operator each label and taint GPU nodes their own way.
PROFILES = {
    "aws": Profile(
        "aws",
        ("s3", "hf"),
        {"node.kubernetes.io/instance-type": "g5.2xlarge"},
        ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
    ),
    "gcp": Profile(
        "gcp",
        ("gs", "hf"),
        {"cloud.google.com/gke-accelerator": "nvidia-l4"},
        (
            {
                "key": "nvidia.com/gpu",
                "operator": "Equal",
                "value": "present",
                "effect": "NoSchedule",
            },
        ),
    ),
    "onprem": Profile(
        "onprem",
        ("pvc", "s3", "hf"),
        {"nvidia.com/gpu.present": "true"},
        ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
    ),
    # kind / minikube: one node, no GPU pool to select or tolerate.
    "local": Profile("local", ("pvc", "s3", "hf"), {}, (), host_folders=True),
}


def identity_problem(profile: Profile, serving: ServingSpec) -> tuple[str, str] | None:
    """The storage identity setting the profile needs and the spec lacks, if any.

    Returns:
        ``(field, message)``, e.g. ``("serving.storage.role_arn", "required for profile aws
        (...)")``, or ``None`` when the identity is complete.
    """
    st = serving.storage
    if profile.name == "aws" and not st.role_arn:
        return (
            "serving.storage.role_arn",
            "required for profile aws (IRSA role of the serving pods)",
        )
    if profile.name == "gcp" and not st.gcp_service_account:
        return (
            "serving.storage.gcp_service_account",
            "required for profile gcp (Workload Identity)",
        )
    if profile.name == "onprem" and not (st.pvc or (st.s3_endpoint and st.credentials_secret)):
        return (
            "serving.storage",
            "profile onprem needs pvc, or s3_endpoint and credentials_secret (MinIO)",
        )
    if profile.name == "local" and bool(st.s3_endpoint) != bool(st.credentials_secret):
        return (
            "serving.storage",
            "profile local reads S3 with both s3_endpoint and credentials_secret",
        )
    return None


def service_account_metadata(
    profile: Profile, serving: ServingSpec
) -> tuple[dict[str, str], list[str]]:
    """The serving ServiceAccount's annotations and the Secrets it references.

    Args:
        profile: the cluster profile.
        serving: the spec's serving block (its ``storage`` settings).

    Returns:
        ``(annotations, secret_names)``.

    Raises:
        LorafleetError: if the profile's identity setting is missing (:func:`identity_problem`).
    """
    problem = identity_problem(profile, serving)
    if problem:
        raise LorafleetError(": ".join(problem))
    st = serving.storage
    if profile.name == "aws":
        return {"eks.amazonaws.com/role-arn": st.role_arn}, []
    if profile.name == "gcp":
        return {"iam.gke.io/gcp-service-account": st.gcp_service_account}, []
    if st.pvc or not st.s3_endpoint:  # a PVC, or (local) no object store at all
        return {}, []
    # KServe's storage initializer reads S3 settings from these ServiceAccount annotations
    # and the keys from the Secrets the ServiceAccount lists.
    https = "1" if st.s3_endpoint.startswith("https://") else "0"
    host = st.s3_endpoint.split("://", 1)[-1]
    return {"serving.kserve.io/s3-endpoint": host, "serving.kserve.io/s3-usehttps": https}, [
        st.credentials_secret
    ]
