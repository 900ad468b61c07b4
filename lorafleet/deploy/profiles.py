"""Cluster profiles: what differs between AWS, GCP and on-prem clusters.

A profile gives the GPU node labels and taints the serving pods tolerate, the storage URI
schemes it can read, and the ServiceAccount that carries the storage identity (IRSA on
AWS, Workload Identity on GCP, an S3 credentials Secret or a PVC on-prem).
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.errors import LorafleetError
from lorafleet.fleet import ServingSpec

__all__ = ["PROFILES", "Profile", "service_account_metadata"]


@dataclass(frozen=True)
class Profile:
    """Defaults of one cluster kind.

    Attributes:
        name: aws, gcp or onprem.
        schemes: storage URI schemes the serving pods can read on this profile.
        gpu_node_selector: labels of the GPU node pool (spec.serving.node_selector wins).
        gpu_tolerations: taints of the GPU node pool, as Toleration dicts.
    """

    name: str
    schemes: tuple[str, ...]
    gpu_node_selector: dict[str, str]
    gpu_tolerations: tuple[dict[str, str], ...]


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
}


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
        LorafleetError: if the profile's identity setting is missing.
    """
    st = serving.storage
    if profile.name == "aws":
        if not st.role_arn:
            raise LorafleetError(
                "serving.storage.role_arn: required for profile aws (IRSA role of the serving pods)"
            )
        return {"eks.amazonaws.com/role-arn": st.role_arn}, []
    if profile.name == "gcp":
        if not st.gcp_service_account:
            raise LorafleetError(
                "serving.storage.gcp_service_account: required for profile gcp (Workload Identity)"
            )
        return {"iam.gke.io/gcp-service-account": st.gcp_service_account}, []
    if st.pvc:
        return {}, []
    if not (st.s3_endpoint and st.credentials_secret):
        raise LorafleetError(
            "serving.storage: profile onprem needs pvc, or s3_endpoint and credentials_secret (MinIO)"
        )
    # KServe's storage initializer reads S3 settings from these ServiceAccount annotations
    # and the keys from the Secrets the ServiceAccount lists.
    https = "1" if st.s3_endpoint.startswith("https://") else "0"
    host = st.s3_endpoint.split("://", 1)[-1]
    return {"serving.kserve.io/s3-endpoint": host, "serving.kserve.io/s3-usehttps": https}, [
        st.credentials_secret
    ]
