"""The Kubernetes API client every lorafleet command that talks to a cluster uses.

The ``kubernetes`` package is imported only when a client is made.
"""

from __future__ import annotations

from pathlib import Path

from lorafleet.errors import LorafleetError

__all__ = ["kube_api"]


def kube_api(kubeconfig: str | Path | None = None):
    """An ``ApiClient`` from ``kubeconfig``, ``$KUBECONFIG`` / ``~/.kube/config``, or in-cluster.

    Raises:
        LorafleetError: when no configuration can be loaded.
    """
    from kubernetes import config
    from kubernetes.client import ApiClient
    from kubernetes.config.config_exception import ConfigException

    try:
        if (
            kubeconfig is None
            and not Path(config.KUBE_CONFIG_DEFAULT_LOCATION).expanduser().exists()
        ):
            config.load_incluster_config()
        else:
            config.load_kube_config(config_file=str(kubeconfig) if kubeconfig else None)
    except ConfigException as exc:
        raise LorafleetError(f"kubeconfig: {exc}") from None
    return ApiClient()
