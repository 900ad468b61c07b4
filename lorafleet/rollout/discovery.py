"""Router replicas from Kubernetes: a Service's ready endpoints, read from its EndpointSlices.

The router keeps routes in memory per replica, so a rollout must reach every replica, not
whichever one a Service's virtual IP picks. A router target may therefore name a Service
instead of (or besides) replica URLs, as ``k8s://NAMESPACE/SERVICE[:PORT]``. On every
controller tick :func:`resolve_urls` lists the ``discovery.k8s.io/v1`` EndpointSlices
labelled ``kubernetes.io/service-name=SERVICE`` in that namespace and turns each ready
endpoint into ``http://ADDRESS:PORT``: the admin calls and the ``/metrics`` scrape of that
tick go to exactly those replicas. ``PORT`` is the port's name or its number as the
EndpointSlice carries it (the pods' target port, e.g. ``8080``, not the Service's ``80``);
without it the Service must expose one port.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
from dataclasses import dataclass

from lorafleet.errors import LorafleetError

__all__ = ["SCHEME", "DiscoveryError", "ServiceRef", "is_service", "resolve_urls"]

SCHEME = "k8s://"
SERVICE_LABEL = "kubernetes.io/service-name"
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_REF = re.compile(
    rf"(?P<namespace>{_DNS_LABEL})/(?P<name>{_DNS_LABEL})(:(?P<port>[a-z0-9]([-a-z0-9]*[a-z0-9])?))?"
)


class DiscoveryError(LorafleetError):
    """A Service's replicas could not be found (no ready endpoints, no such port, API refused)."""


def is_service(url: str) -> bool:
    """Whether a router URL names a Kubernetes Service (``k8s://...``) rather than one replica."""
    return url.startswith(SCHEME)


@dataclass(frozen=True)
class ServiceRef:
    """A Service whose ready endpoints are router replicas.

    Attributes:
        namespace: the Service's namespace.
        name: the Service's name.
        port: the endpoint port's name or number; ``None``: the only one.
    """

    namespace: str
    name: str
    port: str | None = None

    @classmethod
    def parse(cls, url: str) -> ServiceRef:
        """Read ``k8s://NAMESPACE/SERVICE[:PORT]``.

        Raises:
            ValueError: if ``url`` is not of that form (one line, with the form).
        """
        match = _REF.fullmatch(url.removeprefix(SCHEME)) if is_service(url) else None
        if match is None:
            raise ValueError(
                f"{url!r}: a Service is named k8s://NAMESPACE/SERVICE[:PORT], e.g. k8s://lorafleet/fleet-transformer:8080"
            )
        return cls(match["namespace"], match["name"], match["port"])

    def endpoint_urls(self, api) -> list[str]:
        """``http://ADDRESS:PORT`` of every ready endpoint, sorted, each once.

        Args:
            api: a ``kubernetes.client.ApiClient``.

        Raises:
            DiscoveryError: if the API refuses the list, no slice has the port, or no
                endpoint is ready.
        """
        from kubernetes.client import DiscoveryV1Api
        from kubernetes.client.exceptions import ApiException

        where = f"Service {self.namespace}/{self.name}"
        selector = f"{SERVICE_LABEL}={self.name}"
        try:
            listing = DiscoveryV1Api(api).list_namespaced_endpoint_slice(
                self.namespace, label_selector=selector
            )
        except ApiException as exc:
            reason = exc.reason
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                reason = json.loads(exc.body).get("message") or reason
            hint = (
                " (the Role needs list on endpointslices.discovery.k8s.io)"
                if exc.status == 403
                else ""
            )
            raise DiscoveryError(
                f"{where}: listing its EndpointSlices, the API server said {exc.status} {reason}{hint}"
            ) from None
        # The selector asks the API server to filter; checking the label again costs nothing.
        slices = [
            s
            for s in listing.items
            if ((s.metadata and s.metadata.labels) or {}).get(SERVICE_LABEL) == self.name
        ]
        urls: set[str] = set()
        offered: set[str] = set()
        for eps in slices:
            ports = eps.ports or []
            offered.update(f"{p.name or '-'}/{p.port}" for p in ports)
            port = self._pick(ports)
            if port is None:
                continue
            for endpoint in eps.endpoints or []:
                ready = endpoint.conditions.ready if endpoint.conditions else None
                if ready is False or not endpoint.addresses:  # unset means ready (the API's rule)
                    continue
                # Every address of an endpoint is the same pod: one URL per endpoint.
                urls.add(f"http://{_host(endpoint.addresses[0])}:{port}")
        if not urls:
            if offered and not any(self._pick(eps.ports or []) for eps in slices):
                wanted = f"port {self.port}" if self.port else "one port (name it: :PORT)"
                raise DiscoveryError(
                    f"{where}: its endpoints have no {wanted}; they offer {', '.join(sorted(offered))}"
                )
            raise DiscoveryError(
                f"{where}: no ready endpoints (no pod of it is ready, or it selects none)"
            )
        return sorted(urls)

    def _pick(self, ports) -> int | None:
        """The port number of this slice that :attr:`port` names (by name or number)."""
        if self.port is None:
            return ports[0].port if len(ports) == 1 else None
        for p in ports:
            if p.name == self.port or str(p.port) == self.port:
                return p.port
        return None


def _host(address: str) -> str:
    try:
        return f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    except ValueError:  # an FQDN endpoint
        return address


def resolve_urls(urls: list[str], api) -> list[str]:
    """Router replica URLs: plain URLs as given, each ``k8s://`` Service as its ready endpoints.

    Args:
        urls: a router target's ``router_urls``.
        api: a ``kubernetes.client.ApiClient`` (only used when a Service is named).

    Returns:
        The URLs in the given order, each once.

    Raises:
        DiscoveryError: if a named Service has no ready endpoint (see
            :meth:`ServiceRef.endpoint_urls`).
    """
    out: list[str] = []
    for url in urls:
        found = ServiceRef.parse(url).endpoint_urls(api) if is_service(url) else [url]
        out += [u for u in found if u not in out]
    return out
