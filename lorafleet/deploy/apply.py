"""Idempotent apply of rendered manifests through the official kubernetes client.

Each object is read first: created when absent, merge-patched when the live object
differs from it, left alone when it already matches. Then the InferenceService is
watched (polled) until KServe reports its ``Ready`` condition, or the timeout passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorafleet.errors import LorafleetError

__all__ = ["Applied", "apply_objects", "object_path", "wait_ready"]

PLURALS = {
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "ServingRuntime": "servingruntimes",
    "InferenceService": "inferenceservices",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "NetworkPolicy": "networkpolicies",
    "ServiceMonitor": "servicemonitors",
}


@dataclass(frozen=True)
class Applied:
    """One object's outcome: ``created``, ``configured`` or ``unchanged``."""

    kind: str
    name: str
    action: str


def object_path(obj: dict[str, Any], *, with_name: bool = True) -> str:
    """The REST path of a namespaced object (its collection when ``with_name`` is false).

    Raises:
        LorafleetError: for a kind this module does not know.
    """
    kind, meta = obj["kind"], obj["metadata"]
    if kind not in PLURALS:
        raise LorafleetError(f"{kind}/{meta.get('name')}: cannot apply kind {kind}")
    api = obj["apiVersion"]
    prefix = f"/api/{api}" if "/" not in api else f"/apis/{api}"
    path = f"{prefix}/namespaces/{meta['namespace']}/{PLURALS[kind]}"
    return f"{path}/{meta['name']}" if with_name else path


def _contains(live: Any, want: Any) -> bool:
    """Whether every field of ``want`` has the same value in ``live``."""
    if isinstance(want, dict):
        return isinstance(live, dict) and all(_contains(live.get(k), v) for k, v in want.items())
    return live == want


def _call(
    api, path: str, method: str, body: Any = None, content_type: str = "application/json"
) -> Any:
    return api.call_api(
        path,
        method,
        body=body,
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        response_type="object",
        auth_settings=["BearerToken"],
        _return_http_data_only=True,
    )


def apply_objects(api, objects: list[dict[str, Any]]) -> list[Applied]:
    """Create or merge-patch each object, in order, and say what happened to it.

    Args:
        api: a ``kubernetes.client.ApiClient``.
        objects: rendered manifests.

    Returns:
        One :class:`Applied` per object.

    Raises:
        LorafleetError: naming the object and the API server's reason when a call fails.
    """
    from kubernetes.client.exceptions import ApiException

    results = []
    for obj in objects:
        kind, name = obj["kind"], obj["metadata"]["name"]
        try:
            try:
                live = _call(api, object_path(obj), "GET")
            except ApiException as exc:
                if exc.status != 404:
                    raise
                _call(api, object_path(obj, with_name=False), "POST", obj)
                action = "created"
            else:
                if _contains(live, obj):
                    action = "unchanged"
                else:
                    _call(api, object_path(obj), "PATCH", obj, "application/merge-patch+json")
                    action = "configured"
        except ApiException as exc:
            raise LorafleetError(
                f"{kind}/{name}: the API server said {exc.status} {exc.reason}"
            ) from None
        results.append(Applied(kind, name, action))
    return results


def wait_ready(
    api,
    isvc: dict[str, Any],
    timeout_s: float,
    poll_s: float = 5.0,
    on_poll: Callable[[str], None] | None = None,
) -> None:
    """Block until the InferenceService's ``Ready`` condition is ``True``.

    Args:
        api: a ``kubernetes.client.ApiClient``.
        isvc: the rendered InferenceService.
        timeout_s: how long to wait.
        poll_s: seconds between reads.
        on_poll: called with the current state (``Ready=False: reason``) after each read.

    Raises:
        LorafleetError: on timeout, with the last reason KServe gave.
    """
    deadline = time.monotonic() + timeout_s
    state = "no status yet"
    while True:
        live = _call(api, object_path(isvc), "GET")
        conditions = (live.get("status") or {}).get("conditions") or []
        ready = next((c for c in conditions if c.get("type") == "Ready"), None)
        if ready is not None:
            if ready.get("status") == "True":
                return
            state = f"Ready={ready.get('status')}: {ready.get('reason') or ''} {ready.get('message') or ''}".strip()
        if on_poll:
            on_poll(state)
        if time.monotonic() >= deadline:
            name = isvc["metadata"]["name"]
            raise LorafleetError(
                f"InferenceService/{name}: not ready after {timeout_s:g} s ({state})"
            )
        time.sleep(poll_s)
