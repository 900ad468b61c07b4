"""Actuators: put a rollout's canary weight into effect, idempotently.

:class:`RouterActuator` sets one route of the lorafleet router (``PUT /admin/routes/NAME``
on every replica) to ``stable: 100-w, canary: w``; other routes, and so the other adapters
on the shared base, are never touched. At 100% the route holds only the canary, at 0%
(rolled back) only the stable version. :class:`RevisionActuator` merge-patches an
InferenceService's ``spec.predictor.canaryTrafficPercent`` (removed at 100%: KServe then
promotes the latest revision; 0 sends everything back to the previous one).

Both read first and write only what differs, so applying the same weight twice is one
write at most, and a replica that restarted with an old route is healed on the next tick.
"""

from __future__ import annotations

import os
from typing import Protocol

import httpx

from lorafleet.errors import LorafleetError
from lorafleet.rollout.state import Target

__all__ = ["Actuator", "ActuatorError", "RevisionActuator", "RouterActuator", "route_body"]

KSERVE = ("serving.kserve.io", "v1beta1", "inferenceservices")


class ActuatorError(LorafleetError):
    """The weight could not be set (router down, token refused, API server error)."""


class Actuator(Protocol):
    """What the controller needs from an actuator.

    Attributes:
        target: what it moves; a router target's ``router_urls`` are this tick's replicas
            (a Service already resolved to its endpoints), which the metrics source scrapes too.
    """

    target: Target

    def apply(self, weight: int) -> bool:
        """Make the canary's share ``weight`` percent; ``True`` if anything was written."""

    def versions(self) -> tuple[str, str]:
        """The (stable, canary) version names the metrics are labelled with."""

    def waiting(self) -> str | None:
        """Why the canary cannot be judged yet (not serving), or ``None``."""

    def describe(self, weight: int) -> str:
        """One line: where the weight goes, e.g. ``route writer: v3 75% / v4 25%``."""


def route_body(target: Target, weight: int) -> dict:
    """The router route for a canary weight (JSON of :class:`~lorafleet.serve.routes.Route`)."""
    if weight >= 100:
        targets = [{"adapter": target.canary, "weight": 100.0}]
    elif weight <= 0:
        targets = [{"adapter": target.stable, "weight": 100.0}]
    else:
        targets = [
            {"adapter": target.stable, "weight": float(100 - weight)},
            {"adapter": target.canary, "weight": float(weight)},
        ]
    return {"targets": targets, "sticky_header": target.sticky_header}


def _same_route(live: dict, want: dict) -> bool:
    def norm(route: dict) -> tuple:
        weights = {
            t["adapter"]: float(t["weight"])
            for t in route.get("targets", [])
            if float(t["weight"]) > 0
        }
        return tuple(sorted(weights.items())), route.get("sticky_header")

    return norm(live) == norm(want)


class RouterActuator:
    """Weights of one route on every router replica, through the route admin API.

    Args:
        target: a router target (route, stable, canary, token variable) whose
            ``router_urls`` are replica URLs (``k8s://`` Services resolved by the controller).
        timeout_s: per request.

    Raises:
        LorafleetError: if the admin token's environment variable is not set.
    """

    def __init__(self, target: Target, timeout_s: float = 10.0) -> None:
        token = os.environ.get(target.token_env)
        if not token:
            raise LorafleetError(
                f"${target.token_env} is not set: the router's admin API needs its bearer token"
            )
        self.target = target
        self.timeout_s = timeout_s
        self._headers = {"authorization": f"Bearer {token}"}

    def _call(
        self, client: httpx.Client, method: str, url: str, body: dict | None = None
    ) -> httpx.Response:
        try:
            response = client.request(method, url, json=body, headers=self._headers)
        except httpx.HTTPError as exc:
            raise ActuatorError(f"{url}: {type(exc).__name__}: {exc}") from None
        if response.status_code in (401, 403):
            raise ActuatorError(
                f"{url}: {response.status_code}: the router refused the admin token (${self.target.token_env})"
            )
        if response.status_code not in (200, 404):
            try:
                detail = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                detail = response.text[:200]
            raise ActuatorError(f"{url}: {response.status_code}: {detail}")
        return response

    def apply(self, weight: int) -> bool:
        want = route_body(self.target, weight)
        changed = False
        with httpx.Client(timeout=self.timeout_s) as client:
            for base in self.target.router_urls:
                url = f"{base.rstrip('/')}/admin/routes/{self.target.route}"
                live = self._call(client, "GET", url)
                here = want
                if live.status_code == 200 and self.target.sticky_header is None:
                    # a rollout that names no sticky header keeps the route's own
                    here = {**want, "sticky_header": live.json().get("sticky_header")}
                if live.status_code == 200 and _same_route(live.json(), here):
                    continue
                self._call(client, "PUT", url, here)
                changed = True
        return changed

    def current(self) -> list[dict | None]:
        """The route as each replica holds it (``None`` where it has none)."""
        with httpx.Client(timeout=self.timeout_s) as client:
            routes = []
            for base in self.target.router_urls:
                live = self._call(
                    client, "GET", f"{base.rstrip('/')}/admin/routes/{self.target.route}"
                )
                routes.append(live.json() if live.status_code == 200 else None)
            return routes

    def versions(self) -> tuple[str, str]:
        return self.target.stable, self.target.canary

    def waiting(self) -> str | None:
        """The router refuses a route to an adapter that is not loaded: nothing to wait for."""
        return None

    def describe(self, weight: int) -> str:
        shares = {t["adapter"]: t["weight"] for t in route_body(self.target, weight)["targets"]}
        parts = [f"{v} {shares.get(v, 0):g}%" for v in (self.target.stable, self.target.canary)]
        return f"route {self.target.route}: {' / '.join(parts)}"


class RevisionActuator:
    """``canaryTrafficPercent`` of an InferenceService, through the official client.

    Args:
        api: a ``kubernetes.client.ApiClient``.
        target: a revision target (namespace, isvc; stable/canary revision names optional).
    """

    def __init__(self, api, target: Target) -> None:
        from kubernetes.client import CustomObjectsApi

        self.custom = CustomObjectsApi(api)
        self.target = target

    def _get(self) -> dict:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(
                *KSERVE[:2], self.target.namespace, KSERVE[2], self.target.isvc
            )
        except ApiException as exc:
            raise ActuatorError(
                f"InferenceService/{self.target.isvc}: the API server said {exc.status} {exc.reason}"
            ) from None

    def apply(self, weight: int) -> bool:
        from kubernetes.client.exceptions import ApiException

        live = self._get()
        current = ((live.get("spec") or {}).get("predictor") or {}).get("canaryTrafficPercent")
        want = (
            None if weight >= 100 else max(0, weight)
        )  # no field: all traffic to the latest revision
        if (100 if current is None else current) == (100 if want is None else want):
            return False
        try:
            self.custom.patch_namespaced_custom_object(
                *KSERVE[:2],
                self.target.namespace,
                KSERVE[2],
                self.target.isvc,
                {"spec": {"predictor": {"canaryTrafficPercent": want}}},
            )
        except ApiException as exc:
            raise ActuatorError(
                f"InferenceService/{self.target.isvc}: the API server said {exc.status} {exc.reason}"
            ) from None
        return True

    def versions(self) -> tuple[str, str]:
        """The target's names, else KServe's status: previous rolled-out and latest created revision."""
        if self.target.stable and self.target.canary:
            return self.target.stable, self.target.canary
        status = ((self._get().get("status") or {}).get("components") or {}).get("predictor") or {}
        stable = (
            self.target.stable
            or status.get("previousRolledoutRevision")
            or status.get("latestRolledoutRevision")
            or ""
        )
        canary = self.target.canary or status.get("latestCreatedRevision") or ""
        if not stable or not canary or stable == canary:
            raise ActuatorError(
                f"InferenceService/{self.target.isvc}: cannot tell the stable and canary revisions apart from its status "
                f"(stable {stable or '?'}, canary {canary or '?'}); pass --stable and --canary"
            )
        return stable, canary

    def waiting(self) -> str | None:
        """The canary revision is created but not ready (the base model may take minutes to load)."""
        status = ((self._get().get("status") or {}).get("components") or {}).get("predictor") or {}
        created, ready = status.get("latestCreatedRevision"), status.get("latestReadyRevision")
        if created and ready and created != ready:
            return f"waiting for revision {created} to be ready (latest ready: {ready})"
        return None

    def describe(self, weight: int) -> str:
        return f"InferenceService {self.target.isvc}: canaryTrafficPercent {weight}"
