"""Objects rendered from the typed kubernetes/kserve models, per cluster profile."""

from __future__ import annotations

import pytest

from lorafleet.deploy.render import (
    TRAINING_ROLE,
    VLLM_CPU_IMAGE,
    VLLM_IMAGE,
    dump_yaml,
    render,
    resolve_adapters,
    serving_warnings,
)
from lorafleet.deploy.validate import validate_manifests
from lorafleet.errors import LorafleetError, StorageError
from lorafleet.fleet import FleetSpec
from lorafleet.k8s_objects import RUNTIME_IMAGE
from lorafleet.registry import Registry
from lorafleet.storage import RetryPolicy, Storage


def _kind(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def test_render_matches_golden_and_validates(rendered, profile, kit):
    objects = rendered[profile]
    report = validate_manifests(objects, f"deploy render {profile}")
    # Everything but the prometheus-operator ServiceMonitor has a schema to meet.
    assert report.unchecked == ["ServiceMonitor/marketplace-prod-predictor"]
    assert len(report.checked) == len(objects) - 1
    kit.check_golden(f"render-{profile}.yaml", dump_yaml(objects))


def test_vllm_args_come_from_the_registry_versions(rendered, kit):
    isvc = _kind(rendered["aws"], "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    args = model["args"]
    # room for a canary version next to every production one
    assert args[args.index("--max-loras") + 1] == str(2 * len(kit.ADAPTERS))
    assert args[args.index("--max-lora-rank") + 1] == "64"
    adapters = [args[i + 1] for i, a in enumerate(args) if a == "--adapter"]
    assert adapters == [f"{n}=/mnt/models/adapters/{n}/{v}" for n, v in kit.ADAPTERS.items()]
    assert "--enable-lora" in args and "--lora-modules" not in args
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # base and adapters from separate storage URIs
    uris = {u["mountPath"]: u["uri"] for u in isvc["spec"]["predictor"]["storageUris"]}
    assert uris == {
        # base.revision pins the commit KServe's storage initializer downloads
        "/mnt/models/base": (
            "hf://meta-llama/Llama-3.1-8B-Instruct:0e9e39f249a16976918f6564b8830bc894c89659"
        ),
        "/mnt/models/adapters": "s3://marketplace-ml/lorafleet/adapters",
    }


def test_vllm_runs_behind_the_lorafleet_front(rendered):
    # Given the aws fleet (runtime vllm, a GPU)
    container = _kind(rendered["aws"], "ServingRuntime")["spec"]["containers"][0]
    # Then the container runs the front on lorafleet's vLLM image, not vLLM's server
    assert container["image"] == VLLM_IMAGE
    assert container["command"] == ["python3", "-m", "lorafleet.serve.vllm_front"]
    assert container["args"][:4] == ["--host", "0.0.0.0", "--port", "8080"]
    # probed on the front's health endpoints, not vLLM's /health
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    # with the admin token the rollout controller and the router use
    token = next(e for e in container["env"] if e["name"] == "LORAFLEET_ADMIN_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {
        "name": "marketplace-prod-router-admin",
        "key": "token",
        "optional": True,
    }
    # and the metrics scraped are the front's, on the container's one port
    monitor = _kind(rendered["aws"], "ServiceMonitor")
    assert monitor["spec"]["endpoints"] == [
        {"targetPort": 8080, "path": "/metrics", "interval": "30s"}
    ]
    assert container["ports"] == [{"containerPort": 8080, "name": "http", "protocol": "TCP"}]


def test_vllm_on_cpus_renders_the_cpu_build_with_a_bounded_kv_cache(kit):
    # Given the aws fleet on CPU nodes
    raw = kit.fleet_for("aws").model_dump(by_alias=True)
    raw["serving"]["gpus"] = 0
    spec = FleetSpec.model_validate(raw)
    objects = render(spec, "aws", kit.ADAPTERS)
    # Then the front runs on vLLM's CPU build, its KV cache fits the pod, and no GPU is asked
    container = _kind(objects, "ServingRuntime")["spec"]["containers"][0]
    assert container["image"] == VLLM_CPU_IMAGE
    predictor = _kind(objects, "InferenceService")["spec"]["predictor"]
    args = predictor["model"]["args"]
    assert args[args.index("--kv-cache-memory-bytes") + 1] == "8G"
    assert "nvidia.com/gpu" not in predictor["model"]["resources"]["limits"]
    assert "nodeSelector" not in predictor
    # and the spec's warning says so, in one line
    [(field, message)] = serving_warnings(spec)
    assert field == "serving.gpus" and "vLLM's CPU build" in message and "\n" not in message
    assert serving_warnings(kit.fleet_for("aws")) == []


def test_profiles_differ_in_identity_placement_and_runtime(rendered, kit):
    sa = {
        p: next(o for o in rendered[p] if o["metadata"]["name"] == "lorafleet-serving")
        for p in kit.PROFILES
    }
    assert sa["aws"]["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/lorafleet-serving"
    }
    assert sa["gcp"]["metadata"]["annotations"] == {
        "iam.gke.io/gcp-service-account": "lorafleet-serving@marketplace-ml.iam.gserviceaccount.com"
    }
    assert "annotations" not in sa["onprem"]["metadata"]  # PVC: no cloud identity
    gcp = _kind(rendered["gcp"], "InferenceService")["spec"]["predictor"]
    assert gcp["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert gcp["tolerations"][0]["value"] == "present"
    onprem = _kind(rendered["onprem"], "InferenceService")["spec"]["predictor"]
    assert (
        "nodeSelector" not in onprem
        and "nvidia.com/gpu" not in onprem["model"]["resources"]["limits"]
    )
    assert onprem["model"]["args"][:2] == ["--max-batch-size", "64"]
    runtime = _kind(rendered["onprem"], "ServingRuntime")["spec"]["containers"][0]
    assert runtime["image"] == RUNTIME_IMAGE
    # The native runtime loads router-mode canaries through its admin API too: it gets the
    # token the rollout controller calls with.
    token = next(e for e in runtime["env"] if e["name"] == "LORAFLEET_ADMIN_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["name"] == "marketplace-prod-router-admin"
    aws = _kind(rendered["aws"], "InferenceService")["spec"]
    assert "canaryTrafficPercent" not in aws["predictor"]  # RawDeployment: no revisions
    assert aws["transformer"]["containers"][0]["command"][-1] == "lorafleet.serve.router"
    assert "transformer" not in _kind(rendered["gcp"], "InferenceService")["spec"]


def test_onprem_minio_references_the_credentials_secret(kit):
    raw = kit.fleet_for("onprem").model_dump(by_alias=True)
    raw["serving"].update(base_uri="s3://models/base", adapter_store="s3://models/adapters")
    raw["serving"]["storage"] = {
        "s3_endpoint": "http://minio.minio.svc:9000",
        "credentials_secret": "lorafleet-minio",
    }
    objects = render(FleetSpec.model_validate(raw), "onprem", kit.ADAPTERS)
    sa = objects[0]
    assert sa["secrets"] == [{"name": "lorafleet-minio"}]
    assert sa["metadata"]["annotations"] == {
        "serving.kserve.io/s3-endpoint": "minio.minio.svc:9000",
        "serving.kserve.io/s3-usehttps": "0",
    }


def test_pipeline_rbac_is_namespaced_and_never_deletes(rendered):
    role = _kind(rendered["aws"], "Role")
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    assert "delete" not in verbs and "*" not in verbs
    assert role["metadata"]["namespace"] == "lorafleet"
    binding = _kind(rendered["aws"], "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "lorafleet-pipeline", "namespace": "lorafleet"}
    ]
    assert not any(o["kind"].startswith("Cluster") for o in rendered["aws"])


def _trainjob(namespace: str) -> dict:
    return {
        "launcher": "trainjob",
        "cluster": {
            "image": "ghcr.io/lorafleet/lorafleet:0.1.0",
            "namespace": namespace,
            "volume": {"claim": "lorafleet-data", "mount_path": "/data"},
        },
    }


def test_no_training_rbac_without_a_trainjob_expert(rendered):
    # Given the aws fleet, whose experts train in the step's own process (launcher local)
    names = {o["metadata"]["name"] for o in rendered["aws"]}
    assert "lorafleet-pipeline" in names  # the serving RBAC is there
    # Then nothing grants training jobs
    assert TRAINING_ROLE not in names


def test_training_rbac_per_trainjob_namespace(kit):
    # Given two experts training through cluster jobs in two namespaces
    raw = kit.fleet_for("aws").model_dump(by_alias=True)
    raw["serving"]["namespace"] = "serving-ns"
    raw["experts"][0]["training"] = _trainjob("ml-training")
    raw["experts"][1]["training"] = _trainjob("ml-batch")
    # When the fleet is rendered
    objects = render(FleetSpec.model_validate(raw), "aws", kit.ADAPTERS)
    training = [o for o in objects if o["metadata"]["name"] == TRAINING_ROLE]
    # Then each namespace has one Role and one RoleBinding for the pipeline, in expert order
    assert [(o["kind"], o["metadata"]["namespace"]) for o in training] == [
        ("Role", "ml-training"),
        ("RoleBinding", "ml-training"),
        ("Role", "ml-batch"),
        ("RoleBinding", "ml-batch"),
    ]
    for role in (o for o in training if o["kind"] == "Role"):
        grants = {
            (group, resource): rule["verbs"]
            for rule in role["rules"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
        }
        # run_on_cluster creates the job, gets it by name and deletes it when the step fails
        # or is cancelled (GPUs freed): no list or update
        assert grants == {
            ("trainer.kubeflow.org", "trainjobs"): ["get", "create", "delete"],
            ("kubeflow.org", "pytorchjobs"): ["get", "create", "delete"],
            ("", "pods"): ["get", "list", "watch"],
            ("", "events"): ["get", "list", "watch"],
        }
        assert role["metadata"]["labels"]["app.kubernetes.io/component"] == "training"
    for binding in (o for o in training if o["kind"] == "RoleBinding"):
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": TRAINING_ROLE,
        }
        # the pipeline's ServiceAccount lives where the fleet is served
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "lorafleet-pipeline", "namespace": "serving-ns"}
        ]
    validate_manifests(training, "training rbac")


def test_experts_sharing_a_namespace_share_its_training_rbac(kit):
    raw = kit.fleet_for("aws").model_dump(by_alias=True)
    for expert in raw["experts"]:
        expert["training"] = _trainjob("ml-training")
    objects = render(FleetSpec.model_validate(raw), "aws", kit.ADAPTERS)
    training = [
        (o["kind"], o["metadata"]["namespace"])
        for o in objects
        if o["metadata"]["name"] == TRAINING_ROLE
    ]
    assert training == [("Role", "ml-training"), ("RoleBinding", "ml-training")]


@pytest.mark.parametrize(
    ("target", "change", "message"),
    [
        (
            "gcp",
            {},
            "serving.adapter_store: 's3://marketplace-ml/lorafleet/adapters' cannot be read on profile gcp",
        ),
        ("aws", {"storage": {}}, "serving.storage.role_arn: required for profile aws"),
        ("onprem", {"storage": {"s3_endpoint": "http://minio:9000"}}, "profile onprem needs pvc"),
    ],
)
def test_spec_that_does_not_fit_the_profile_is_refused(target, change, message, kit):
    raw = kit.fleet_for("aws").model_dump(by_alias=True)
    raw["serving"].update(change)
    with pytest.raises(LorafleetError, match=message.replace("(", r"\(")):
        render(FleetSpec.model_validate(raw), target, kit.ADAPTERS)


def test_adapters_resolve_to_production_else_latest(tmp_path, kit, aws_env, unreachable_endpoint):
    fleet_for = kit.fleet_for
    registry = Registry(tmp_path / "registry")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"\0")
    for expert in ("proposal-writer", "proposal-writer", "job-analyzer"):
        registry.register(expert, adapter, {}, lambda v: v)
    registry.set_production("proposal-writer", "v1")
    assert resolve_adapters(fleet_for("aws"), registry.root) == {
        "proposal-writer": "v1",
        "job-analyzer": "v1",
    }
    with pytest.raises(
        LorafleetError, match="no expert of fleet 'marketplace-prod' has a registered adapter"
    ):
        resolve_adapters(fleet_for("aws"), tmp_path / "empty")
    # A registry in a bucket is read there (tests/test_registry_s3.py); an unreachable one
    # is the storage layer's one line
    remote = fleet_for("aws").model_copy(
        update={
            "registry": fleet_for("aws").registry.model_copy(
                update={"uri": "s3://lorafleet-test/r"}
            )
        }
    )
    storage = Storage(
        s3_endpoint_url=unreachable_endpoint, pvc_mounts={}, retry=RetryPolicy(attempts=1)
    )
    with pytest.raises(
        StorageError,
        match=r"^s3://lorafleet-test/r/proposal-writer/production.json: store unreachable",
    ):
        resolve_adapters(remote, storage=storage)
