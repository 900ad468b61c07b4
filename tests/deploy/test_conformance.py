"""What a real cluster accepts: every rendered object against the upstream CRDs and webhooks.

The CRDs (KServe, Kubeflow Trainer, Training Operator, Argo CD, Flux, prometheus-operator) are
read in place from ``../shared/upstream/crds/`` beside the project root (see its README.md for
the upstream file and commit of each); they are upstream data and are not copied here. Each
object is checked three ways:

- **schema**: the CRD's ``openAPIV3Schema`` of the served version, with a JSON-schema validator
  (types, enums, patterns, required fields, bounds);
- **unknown fields**: a structural schema makes the API server *prune* a field it does not
  declare, silently; here each such field is a failure;
- **admission webhooks**: the upstream validating-webhook rules that apply to what we render,
  restated in Python below, each citing the upstream Go file it comes from.

Core kinds (ServiceAccount, Role, Deployment, ...) are checked strictly by kubernetes-validate
(``lorafleet.deploy.validate``). Lowest versions these rules stand for: KServe 0.16 (the
webhook that refuses ``predictor.model.name``), Kubeflow Trainer 2.3 (the TrainJob CRD and SDK
the project uses; the runtimePatches manager rule since 2.2), Training Operator 1.9.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from lorafleet.deploy.render import render
from lorafleet.deploy.validate import validate_manifests
from lorafleet.fleet import FleetSpec, TrainingSettings
from lorafleet.train.cluster import build_pytorchjob, build_trainjob
from lorafleet.train.job import TrainJobConfig

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM = ROOT.parent / "shared" / "upstream" / "crds"
ADAPTERS = {"proposal-writer": "v2", "job-analyzer": "v1"}

pytestmark = pytest.mark.skipif(
    not UPSTREAM.is_dir(),
    reason=f"upstream CRDs absent: {UPSTREAM} not found (CI has it beside the project root); "
    "the conformance tests did not run",
)


# ---------------------------------------------------------------------------------------------
# The upstream schemas
# ---------------------------------------------------------------------------------------------


@cache
def crd_schemas() -> dict[tuple[str, str], list[tuple[str, dict]]]:
    """(apiVersion, kind) -> [(CRD file, openAPIV3Schema of that served version)]."""
    found: dict[tuple[str, str], list[tuple[str, dict]]] = {}
    for path in sorted(UPSTREAM.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                if version.get("served"):
                    key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                    schema = version["schema"]["openAPIV3Schema"]
                    found.setdefault(key, []).append((path.name, schema))
    return found


def pruned_fields(value: Any, schema: dict, path: str = "") -> Iterator[str]:
    """Fields the API server would drop: not declared by a structural schema.

    ``metadata`` is the API server's own ObjectMeta (not described by CRDs) and is skipped.
    """
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict) and schema.get("type", "object") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            where = f"{path}.{key}"
            if path == "" and key == "metadata":
                continue
            if props is not None and key in props:
                yield from pruned_fields(item, props[key], where)
            elif isinstance(extra, dict):
                yield from pruned_fields(item, extra, where)
            elif props is not None or extra is False:
                yield f"{where}: unknown field (pruned by the API server)"
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from pruned_fields(item, schema["items"], f"{path}[{i}]")


def schema_errors(obj: dict) -> list[str]:
    """Schema and pruning problems of ``obj`` against every upstream CRD of its kind."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    problems = []
    for source, schema in crd_schemas()[key]:
        # OpenAPI v3.0 schemas are closest to draft 4 (boolean exclusiveMinimum, no const).
        for err in jsonschema.Draft4Validator(schema).iter_errors(obj):
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.path)
            problems.append(f"{source}: {where or '.'}: {err.message}")
        problems += [f"{source}: {p}" for p in pruned_fields(obj, schema)]
    return problems


# ---------------------------------------------------------------------------------------------
# The upstream admission-webhook rules, restated
# ---------------------------------------------------------------------------------------------

# kserve/kserve pkg/apis/serving/v1beta1/inference_service_validation.go: IsvcNameFmt.
ISVC_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# kserve pkg/constants/constants.go: AutoscalerAllowedHPAMetricsList / AutoscalerAllowedKPAMetricsList.
HPA_METRICS = ("cpu", "memory")
KPA_METRICS = ("concurrency", "rps")
# k8s.io/apimachinery pkg/util/validation: IsDNS1123Subdomain (the domain part of a prefixed path).
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _kserve_mode(annotations: dict[str, str]) -> str:
    return annotations.get("serving.kserve.io/deploymentMode", "")


def inference_service_webhook(isvc: dict) -> list[str]:
    """KServe's validating webhook (>= 0.16) for what we render, plus what it silently ignores.

    Rules from kserve/kserve ``pkg/apis/serving/v1beta1/inference_service_validation.go``:
    ``validateInferenceServiceName``, ``validatePredictor`` (no ``name`` in a standard
    predictor), ``validateAutoScalingCompExtension`` (the mode switch: ``Standard`` with the
    ``hpa`` autoscaler class -> ``validateScalingHPACompExtension``: metric cpu or memory,
    a cpu target 1-100; anything else that is not Knative's HPA class ->
    ``validateScalingKPACompExtension``: metric concurrency or rps, no deploymentStrategy).
    Note the switch compares the raw annotation: the legacy value ``RawDeployment`` falls into
    the KPA branch there, though the reconciler makes an HPA.
    """
    problems = []
    meta, spec = isvc["metadata"], isvc["spec"]
    if not ISVC_NAME.match(meta["name"]):
        problems.append(f"name {meta['name']!r}: must match {ISVC_NAME.pattern}")
    predictor = spec["predictor"]
    if (predictor.get("model") or {}).get("name"):
        problems.append(
            ".spec.predictor.model.name: the 'name' field is not allowed in standard predictor"
        )
    annotations = meta.get("annotations") or {}
    mode = _kserve_mode(annotations)
    hpa = mode == "Standard" and annotations.get("serving.kserve.io/autoscalerClass") == "hpa"
    for component in ("predictor", "transformer"):
        ext = spec.get(component)
        if not ext:
            continue
        metric = ext.get("scaleMetric")
        if hpa:
            metric = metric or "cpu"
            if metric not in HPA_METRICS:
                problems.append(
                    f".spec.{component}.scaleMetric: [{metric}] is not a supported metric"
                )
            target = ext.get("scaleTarget")
            if metric == "cpu" and target is not None and not 1 <= target <= 100:
                problems.append(f".spec.{component}.scaleTarget: cpu utilisation must be 1-100")
        elif mode != "Standard":
            metric = metric or "concurrency"
            if metric not in KPA_METRICS:
                problems.append(
                    f".spec.{component}.scaleMetric: [{metric}] is not a supported metric"
                )
    # Not a webhook rule: what KServe accepts and then ignores. Only the Knative reconciler
    # reads canaryTrafficPercent (pkg/controller/v1beta1/inferenceservice/reconcilers/knative);
    # the raw (Standard) reconciler makes a Deployment and never splits traffic.
    if mode in ("Standard", "RawDeployment") and "canaryTrafficPercent" in predictor:
        problems.append(
            ".spec.predictor.canaryTrafficPercent: ignored in Standard (RawDeployment) mode"
        )
    return problems


def trainjob_webhook(job: dict) -> list[str]:
    """Kubeflow Trainer's TrainJob admission (>= 2.2) for what we build.

    kubeflow/trainer ``pkg/webhooks/trainjob_webhook.go`` (``TrainJobValidator`` ->
    ``runtime.ValidateObjects``): each ``spec.runtimePatches[].manager`` must be a
    domain-prefixed path (apimachinery ``validation.IsDomainPrefixedPath``, as Kueue's
    ``kueue.x-k8s.io/manager``), managers are unique; the TrainJob's name must be a DNS-1035
    label (its JobSet and Services are named after it).
    """
    problems = []
    name = job["metadata"]["name"]
    if not DNS1035_LABEL.match(name) or len(name) > 63:
        problems.append(f"name {name!r}: must be a DNS-1035 label")
    managers = [p.get("manager", "") for p in job["spec"].get("runtimePatches") or []]
    for i, manager in enumerate(managers):
        domain, _, rest = manager.partition("/")
        if not (domain and rest and DNS1123_SUBDOMAIN.match(domain) and len(domain) <= 253):
            problems.append(
                f".spec.runtimePatches[{i}].manager: Invalid value: {manager!r}: must be a "
                'domain-prefixed path (such as "acme.io/foo")'
            )
    if len(set(managers)) != len(managers):
        problems.append(".spec.runtimePatches: duplicate manager")
    return problems


WEBHOOKS = {
    "InferenceService": inference_service_webhook,
    "TrainJob": trainjob_webhook,
}


def conformance_problems(objects: list[dict], source: str) -> list[str]:
    """Every refusal (or silent prune) a cluster would make of ``objects``."""
    problems, core = [], []
    for obj in objects:
        ident = f"{source}: {obj['kind']}/{obj['metadata']['name']}"
        if (obj.get("apiVersion"), obj.get("kind")) in crd_schemas():
            problems += [f"{ident}: {p}" for p in schema_errors(obj)]
            problems += [f"{ident}: webhook: {p}" for p in WEBHOOKS.get(obj["kind"], _none)(obj)]
        else:
            core.append(obj)
    try:
        report = validate_manifests(core, source)
    except Exception as exc:  # ManifestError: one line per problem
        problems += str(exc).splitlines()[1:]
    else:
        # every core kind has a strict schema; anything else is a CRD we lack
        assert not report.unchecked, f"{source}: no schema for {report.unchecked}"
    return problems


def _none(_obj: dict) -> list[str]:
    return []


def assert_accepted(objects: list[dict], source: str) -> None:
    assert objects, f"{source}: nothing rendered"
    problems = conformance_problems(objects, source)
    assert not problems, "a cluster refuses or prunes:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# What we render
# ---------------------------------------------------------------------------------------------


def _local_fleet(kit, tmp_path: Path) -> FleetSpec:
    raw = kit.fleet_for("onprem").model_dump(by_alias=True)
    (tmp_path / "base").mkdir()
    (tmp_path / "adapters").mkdir()
    raw["serving"].update(
        profile="local",
        base_uri=str(tmp_path / "base"),
        adapter_store=str(tmp_path / "adapters"),
        storage={},
    )
    return FleetSpec.model_validate(raw)


def _variant(kit, profile: str, **serving: Any) -> FleetSpec:
    raw = kit.fleet_for(profile).model_dump(by_alias=True)
    raw["serving"].update(serving)
    return FleetSpec.model_validate(raw)


def test_deploy_render_is_accepted_for_every_profile(rendered, kit, tmp_path) -> None:
    for profile in kit.PROFILES:
        assert_accepted(rendered[profile], f"deploy render {profile}")
    assert_accepted(render(_local_fleet(kit, tmp_path), "local", ADAPTERS), "deploy render local")


@pytest.mark.parametrize(
    ("label", "profile", "serving", "canary"),
    [
        ("lorafleet runtime with router", "aws", {"runtime": "lorafleet", "gpus": 0}, {}),
        ("vLLM front on CPUs", "gcp", {"gpus": 0}, {}),
        (
            "Serverless with a revision canary",
            "gcp",
            {
                "deployment_mode": "Serverless",
                "canary_traffic_percent": 10,
                "autoscaling": {"scale_metric": "concurrency", "scale_target": 8},
            },
            {},
        ),
        (
            "memory HPA",
            "onprem",
            {"autoscaling": {"scale_metric": "memory", "scale_target": 2048}},
            {},
        ),
        ("rollout controller", "aws", {}, {"handoff": "controller"}),
        (
            "gated hub base beside MinIO keys",
            "onprem",
            {
                "base_uri": "",
                "adapter_store": "s3://models/adapters",
                "storage": {"s3_endpoint": "http://minio:9000", "credentials_secret": "minio"},
            },
            {},
        ),
    ],
)
def test_deploy_render_options_are_accepted(kit, label, profile, serving, canary) -> None:
    raw = kit.fleet_for(profile).model_dump(by_alias=True)
    raw["serving"].update(serving)
    raw["canary"] = {**raw["canary"], **canary}
    assert_accepted(render(FleetSpec.model_validate(raw), profile, ADAPTERS), label)


def test_helm_chart_is_accepted_for_every_values_file(helm_rendered, kit) -> None:
    from helm_python import Chart

    for profile in kit.PROFILES:
        assert_accepted(helm_rendered[profile], f"helm values-{profile}.yaml")
    chart = kit.ROOT / "helm" / "lorafleet"
    files = Chart.load(chart).render({}, name="lorafleet", namespace="lorafleet")
    defaults = [
        d
        for path in sorted(files)
        if path.endswith(".yaml")
        for d in yaml.safe_load_all(files[path])
        if d
    ]
    assert_accepted(defaults, "helm values.yaml")


def test_kustomize_overlays_are_accepted(kustomize_rendered, kit) -> None:
    for profile in kit.PROFILES:
        assert_accepted(kustomize_rendered[profile], f"kustomize {profile}")


def test_training_jobs_are_accepted() -> None:
    training = TrainingSettings(
        launcher="trainjob",
        nodes=2,
        gpus_per_node=4,
        cluster={
            "image": "registry.example/lorafleet:0.1.0",
            "namespace": "ml-train",
            "volume": {"claim": "lorafleet-data", "mount_path": "/data"},
            "node_selector": {"gpu": "h100"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
        },
    )
    job = TrainJobConfig(
        base_dir="/data/base",
        train_set="/data/job-analyzer/train.jsonl",
        output_dir="/data/job-analyzer/adapter",
        training=training,
    )
    name = "lorafleet-job-analyzer-0123abcd"
    assert_accepted([build_trainjob(name, job, training)], "build_trainjob")
    assert_accepted([build_pytorchjob(name, job, training)], "build_pytorchjob")
    # A hub base: the pods get the hub's environment and the token from its Secret
    hub = job.model_copy(update={"base_dir": "meta-llama/Llama-3.1-8B-Instruct"})
    trainjob = build_trainjob(name, hub, training, "hf-token")
    assert any("valueFrom" in e for e in trainjob["spec"]["trainer"]["env"])
    assert_accepted([trainjob], "build_trainjob, hub base")
    assert_accepted(
        [build_pytorchjob(name, hub, training, "hf-token")], "build_pytorchjob, hub base"
    )


def test_gitops_examples_are_accepted(kit) -> None:
    for path in sorted((kit.ROOT / "examples" / "gitops").glob("*.yaml")):
        objects = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert_accepted(objects, f"examples/gitops/{path.name}")


# ---------------------------------------------------------------------------------------------
# The checks themselves catch what the cluster refuses
# ---------------------------------------------------------------------------------------------


def _isvc(rendered) -> dict:
    return copy.deepcopy(next(o for o in rendered["aws"] if o["kind"] == "InferenceService"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda o: o["spec"]["predictor"]["model"].update(name="kserve-container"),
            "not allowed in standard predictor",
        ),
        (lambda o: o["metadata"].update(name="1st-fleet"), "name '1st-fleet'"),
        (
            lambda o: o["spec"]["predictor"].update(scaleMetric="concurrency"),
            "[concurrency] is not a supported metric",
        ),
        (lambda o: o["spec"]["predictor"].update(canaryTrafficPercent=10), "ignored in Standard"),
        (lambda o: o["spec"]["predictor"].update(scaleMetrc="cpu"), "scaleMetrc: unknown field"),
        (
            lambda o: o["spec"]["predictor"].update(minReplicas="one"),
            "'one' is not of type 'integer'",
        ),
    ],
)
def test_a_refused_inference_service_is_reported(rendered, change, message) -> None:
    isvc = _isvc(rendered)
    assert conformance_problems([isvc], "test") == []
    change(isvc)
    problems = conformance_problems([isvc], "test")
    assert any(message in p for p in problems), problems


def test_a_trainjob_manager_without_a_domain_is_refused() -> None:
    job = {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": "j"},
        "spec": {
            "runtimeRef": {"name": "torch-distributed"},
            "runtimePatches": [{"manager": "lorafleet"}],
        },
    }
    assert any("domain-prefixed path" in p for p in trainjob_webhook(job))
