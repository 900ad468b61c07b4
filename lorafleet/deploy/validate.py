"""Offline validation of rendered manifests, against the schemas their owners publish.

Core kinds go through ``kubernetes-validate --strict`` for :data:`K8S_VERSION` (unknown
fields are errors). KServe kinds are checked against the kserve SDK's generated models:
each model's ``attribute_map`` names the fields it accepts and ``openapi_types`` their
types, recursively down to the ``kubernetes.client`` models they embed. Kinds that
neither covers (the prometheus-operator ServiceMonitor) are reported as unchecked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from lorafleet.errors import LorafleetError

__all__ = ["K8S_VERSION", "ManifestError", "Report", "kserve_errors", "validate_manifests"]

K8S_VERSION = "1.30"
KSERVE_KINDS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
}
_LIST = re.compile(r"^list\[(.+)\]$")
_DICT = re.compile(r"^dict\(str, (.+)\)$")
_SCALARS = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


class ManifestError(LorafleetError):
    """Rendered manifests break their schemas; one line per problem."""


@dataclass
class Report:
    """What :func:`validate_manifests` checked."""

    checked: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    # Why core kinds went unchecked, when they did (kubernetes-validate not installed).
    note: str | None = None


def _model_class(name: str) -> type:
    from kserve import models as ks
    from kubernetes.client import models as k8s

    cls = getattr(ks, name, None) or getattr(k8s, name, None)
    if cls is None:
        raise KeyError(f"no kserve or kubernetes model named {name}")
    return cls


def kserve_errors(value: Any, type_name: str, path: str = "") -> list[str]:
    """Problems of ``value`` (plain data) against the SDK model type ``type_name``.

    Args:
        value: deserialized YAML/JSON.
        type_name: an ``openapi_types`` type: a model name, ``list[...]``,
            ``dict(str, ...)``, ``str``, ``int``, ``float``, ``bool`` or ``object``.
        path: where ``value`` sits, for the messages.

    Returns:
        ``"path: message"`` strings; empty when the value fits.
    """
    where = path or "."
    if value is None or type_name == "object":
        return []
    if m := _LIST.match(type_name):
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        return [
            e for i, v in enumerate(value) for e in kserve_errors(v, m.group(1), f"{path}[{i}]")
        ]
    if m := _DICT.match(type_name):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping, got {type(value).__name__}"]
        return [e for k, v in value.items() for e in kserve_errors(v, m.group(1), f"{path}.{k}")]
    if type_name in _SCALARS:
        ok = isinstance(value, _SCALARS[type_name]) and (
            type_name == "bool" or not isinstance(value, bool)
        )
        return (
            [] if ok else [f"{where}: expected {type_name}, got {type(value).__name__} {value!r}"]
        )
    if type_name == "datetime":
        return [] if isinstance(value, str) else [f"{where}: expected a timestamp string"]
    cls = _model_class(type_name)
    if not isinstance(value, dict):
        return [f"{where}: expected a {type_name} mapping, got {type(value).__name__}"]
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    errors = []
    for key, v in value.items():
        attr = by_json.get(key)
        if attr is None:
            errors.append(f"{path}.{key}: unknown field (not in {type_name})")
        else:
            errors += kserve_errors(v, cls.openapi_types[attr], f"{path}.{key}")
    return errors


def validate_manifests(
    objects: list[dict[str, Any]], source: str, k8s_version: str = K8S_VERSION
) -> Report:
    """Validate every object; raise with all problems at once.

    Args:
        objects: manifests (dicts) as rendered.
        source: what rendered them (for the messages), e.g. ``helm aws``.
        k8s_version: the Kubernetes version whose schemas core kinds must meet.

    Returns:
        Which objects were checked and which no schema covers.

    Raises:
        ManifestError: naming source, kind/name, field path and rule for each problem.
    """
    try:
        # 100+ MB of schemas: a dev and CI dependency (the `validate` extra), not in the images.
        import kubernetes_validate as kv
    except ImportError:
        kv = None
    report, problems = Report(), []
    for obj in objects:
        ident = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        model = KSERVE_KINDS.get((obj.get("apiVersion"), obj.get("kind")))
        if model:
            problems += [f"{source}: {ident}: {e}" for e in kserve_errors(obj, model)]
            report.checked.append(ident)
            continue
        if kv is None:
            report.unchecked.append(ident)
            report.note = (
                "core kinds not schema-checked: kubernetes-validate is not installed "
                "(pip install 'lorafleet[validate]')"
            )
            continue
        try:
            kv.validate(obj, k8s_version, strict=True)
        except kv.SchemaNotFoundError:
            report.unchecked.append(ident)
            continue
        except kv.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path) or "."
            problems.append(f"{source}: {ident}: .{where}: {exc.message}")
            continue
        report.checked.append(ident)
    if problems:
        raise ManifestError("invalid manifests:\n" + "\n".join(problems))
    return report
