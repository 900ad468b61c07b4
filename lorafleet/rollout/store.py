"""Where rollout states live: a ConfigMap per rollout in the cluster, a JSON file locally.

Both stores compare-and-swap on :attr:`RolloutState.revision`: a write that started from
an older state (the controller was deciding while an operator paused) raises
:class:`Conflict`, and the writer reads again. The ConfigMap store also sends the
ConfigMap's ``resourceVersion`` when the API server gives one, so the server itself refuses
a lost update. Neither store keeps anything in memory: a new process sees what the last
one wrote.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from lorafleet.errors import LorafleetError, first_problem
from lorafleet.io import atomic_write_text
from lorafleet.rollout.state import RolloutState

__all__ = [
    "CONFIGMAP_PREFIX",
    "ROLLOUT_LABEL",
    "ConfigMapStore",
    "Conflict",
    "FileStore",
    "NotFound",
    "StateStore",
]

CONFIGMAP_PREFIX = "lorafleet-rollout-"
ROLLOUT_LABEL = "lorafleet.io/rollout"
_KEY = "state.json"


class NotFound(LorafleetError):
    """No rollout of that name."""


class Conflict(Exception):
    """The stored state changed since it was read; read it again and redo the change."""


class StateStore(Protocol):
    """What the controller needs from a store."""

    where: str

    def load(self, name: str) -> RolloutState:
        """The stored state; raises :class:`NotFound`."""

    def save(self, state: RolloutState) -> RolloutState:
        """Store ``state`` if the stored revision is still ``state.revision``; returns it
        with the revision bumped. Raises :class:`Conflict` otherwise."""

    def create(self, state: RolloutState, replace: bool = False) -> RolloutState:
        """Store a new rollout (over an existing one only when ``replace``)."""

    def names(self) -> list[str]:
        """Every stored rollout's name, sorted."""

    def delete(self, name: str) -> None:
        """Forget a rollout (a start that could not move any weight); absent is fine."""


def _parse(text: str, where: str) -> RolloutState:
    try:
        return RolloutState.model_validate_json(text)
    except ValidationError as exc:
        raise LorafleetError(f"{where}: rollout state: {first_problem(exc, 'state')}") from None


class FileStore:
    """One ``NAME.json`` per rollout in a directory (local mode), locked while written.

    Args:
        root: the directory (created when needed).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.where = str(self.root)

    def _path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self, name: str) -> RolloutState | None:
        path = self._path(name)
        try:
            return _parse(path.read_text(encoding="utf-8"), str(path))
        except FileNotFoundError:
            return None

    def load(self, name: str) -> RolloutState:
        state = self._read(name)
        if state is None:
            raise NotFound(f"no rollout {name!r} in {self.where}")
        return state

    def save(self, state: RolloutState) -> RolloutState:
        with self._locked(state.name):
            live = self._read(state.name)
            if live is None or live.revision != state.revision:
                raise Conflict(state.name)
            return self._write(state)

    def create(self, state: RolloutState, replace: bool = False) -> RolloutState:
        with self._locked(state.name):
            live = self._read(state.name)
            if live is not None and not replace:
                raise Conflict(state.name)
            return self._write(state.model_copy(update={"revision": live.revision if live else 0}))

    def _write(self, state: RolloutState) -> RolloutState:
        new = state.model_copy(update={"revision": state.revision + 1})
        atomic_write_text(self._path(state.name), new.model_dump_json(indent=2) + "\n")
        return new

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.json")) if self.root.is_dir() else []

    def delete(self, name: str) -> None:
        with self._locked(name):
            self._path(name).unlink(missing_ok=True)


class ConfigMapStore:
    """One ConfigMap ``lorafleet-rollout-NAME`` per rollout, through the official client.

    Args:
        api: a ``kubernetes.client.ApiClient``.
        namespace: where the ConfigMaps live (the fleet's serving namespace).
    """

    def __init__(self, api, namespace: str) -> None:
        from kubernetes.client import CoreV1Api

        self.core = CoreV1Api(api)
        self.namespace = namespace
        self.where = f"namespace {namespace}"

    def _get(self, name: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            live = self.core.read_namespaced_config_map(CONFIGMAP_PREFIX + name, self.namespace)
            return self.core.api_client.sanitize_for_serialization(live)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _api_error(exc, name) from None

    def _state(self, live: dict, name: str) -> RolloutState:
        text = (live.get("data") or {}).get(_KEY)
        if not text:
            raise LorafleetError(f"ConfigMap/{CONFIGMAP_PREFIX}{name}: no {_KEY}")
        return _parse(text, f"ConfigMap/{CONFIGMAP_PREFIX}{name}")

    def load(self, name: str) -> RolloutState:
        live = self._get(name)
        if live is None:
            raise NotFound(f"no rollout {name!r} in {self.where}")
        return self._state(live, name)

    def _body(self, state: RolloutState, resource_version: str | None) -> dict:
        metadata = {
            "name": CONFIGMAP_PREFIX + state.name,
            "namespace": self.namespace,
            "labels": {
                ROLLOUT_LABEL: state.name,
                "app.kubernetes.io/managed-by": "lorafleet",
                "app.kubernetes.io/component": "rollout",
            },
        }
        if resource_version:
            metadata["resourceVersion"] = resource_version
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata,
            "data": {_KEY: state.model_dump_json()},
        }

    def save(self, state: RolloutState) -> RolloutState:
        from kubernetes.client.exceptions import ApiException

        live = self._get(state.name)
        if live is None or self._state(live, state.name).revision != state.revision:
            raise Conflict(state.name)
        new = state.model_copy(update={"revision": state.revision + 1})
        version = (live.get("metadata") or {}).get("resourceVersion")
        try:
            self.core.patch_namespaced_config_map(
                CONFIGMAP_PREFIX + state.name, self.namespace, self._body(new, version)
            )
        except ApiException as exc:
            if exc.status == 409:  # the server saw a newer resourceVersion
                raise Conflict(state.name) from None
            raise _api_error(exc, state.name) from None
        return new

    def create(self, state: RolloutState, replace: bool = False) -> RolloutState:
        from kubernetes.client.exceptions import ApiException

        live = self._get(state.name)
        if live is not None:
            if not replace:
                raise Conflict(state.name)
            return self.save(
                state.model_copy(update={"revision": self._state(live, state.name).revision})
            )
        new = state.model_copy(update={"revision": 1})
        try:
            self.core.create_namespaced_config_map(self.namespace, self._body(new, None))
        except ApiException as exc:
            if exc.status == 409:
                raise Conflict(state.name) from None
            raise _api_error(exc, state.name) from None
        return new

    def names(self) -> list[str]:
        from kubernetes.client.exceptions import ApiException

        try:
            listing = self.core.api_client.sanitize_for_serialization(
                self.core.list_namespaced_config_map(self.namespace, label_selector=ROLLOUT_LABEL)
            )
        except ApiException as exc:
            raise _api_error(exc, "*") from None
        names = [
            ((item.get("metadata") or {}).get("labels") or {}).get(ROLLOUT_LABEL)
            for item in listing.get("items") or []
        ]
        return sorted(n for n in names if n)

    def delete(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        live = self._get(name)
        if live is None:
            return
        try:
            self.core.delete_namespaced_config_map(live["metadata"]["name"], self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise _api_error(exc, name) from None


def _api_error(exc, name: str) -> LorafleetError:
    reason = exc.reason
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        reason = json.loads(exc.body).get("message") or reason
    return LorafleetError(
        f"ConfigMap/{CONFIGMAP_PREFIX}{name}: the API server said {exc.status} {reason}"
    )
