"""Kubernetes objects for serving a fleet, built from typed models.

Every object is a ``kubernetes.client`` or ``kserve`` model, turned into plain data with
``ApiClient().sanitize_for_serialization``; nothing is assembled from YAML text. The
ServiceMonitor (prometheus-operator) has no model in either client: it is the one plain
mapping, and its typed parts (metadata, selector) still come from models.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s

from lorafleet.deploy.profiles import (
    PROFILES,
    Profile,
    identity_problem,
    service_account_metadata,
)
from lorafleet.errors import LorafleetError
from lorafleet.fleet import FleetSpec, ServingSpec
from lorafleet.fleet.serving import VLLM_VERSION
from lorafleet.io import atomic_write_text
from lorafleet.k8s_objects import (
    ADAPTER_MOUNT,
    KSERVE,
    PIPELINE_SA,
    PORT,
    RUNTIME_IMAGE,
    container_security_context,
    object_meta,
    pod_security_context,
)
from lorafleet.registry import Registry
from lorafleet.rollout.manifests import controller_objects, rollout_rbac
from lorafleet.storage import LocationLike, Storage

__all__ = [
    "TRAINING_ROLE",
    "VLLM_BASE_IMAGE",
    "VLLM_CPU_IMAGE",
    "VLLM_IMAGE",
    "deployment_annotations",
    "dump_yaml",
    "profile_field",
    "render",
    "resolve_adapters",
    "serving_problems",
    "serving_warnings",
    "trained_base",
    "write_objects",
]

# vLLM's release image that lorafleet/serve/Dockerfile.vllm builds on (its VLLM_IMAGE argument).
VLLM_BASE_IMAGE = f"docker.io/vllm/vllm-openai:v{VLLM_VERSION}"
# lorafleet's front on that image: fixed tags, like the runtime image's (the release pipeline
# may pin a digest on top). The -cpu variant is the same Dockerfile on vLLM's CPU build.
VLLM_IMAGE = f"ghcr.io/lorafleet/lorafleet-vllm:0.1.0-vllm{VLLM_VERSION}"
# The memory-backed /dev/shm of a vLLM pod with tensor parallelism (gpus > 1).
VLLM_SHM_SIZE = "16Gi"
VLLM_CPU_IMAGE = f"{VLLM_IMAGE}-cpu"
# vLLM's CPU build sizes its KV cache from the node's memory, not the pod's limit: a fixed
# size keeps it inside the container's 32Gi with an 8B base's weights.
VLLM_CPU_KV_CACHE = "8G"
BASE_MOUNT = "/mnt/models/base"
TRAINING_ROLE = "lorafleet-pipeline-training"  # the pipeline's grant where trainjob experts train
SERVING_SA = "lorafleet-serving"
# Namespaces whose pods may call the predictor: the ingress gateway and Prometheus.
INGRESS_NAMESPACES = ("istio-system", "monitoring")


def resolve_adapters(
    spec: FleetSpec, registry: LocationLike | None = None, storage: Storage | None = None
) -> dict[str, str]:
    """The adapter version each expert serves: production, else the latest registered.

    Args:
        spec: the fleet.
        registry: the registry to read (a folder, ``file://``, ``s3://``, ``gs://`` or
            ``pvc://``); default: ``spec.registry.uri``.
        storage: the storage layer (default: configured from the environment).

    Returns:
        expert name -> version (``v3``), in spec order; experts with no version are left out.

    Raises:
        LorafleetError: if no expert has a registered adapter.
        StorageError: if the registry cannot be read (one line: unreachable, denied, ...).
    """
    reader = Registry(registry or spec.registry.uri, storage)
    versions = {}
    for expert in spec.experts:
        entry = reader.production(expert.name) or reader.latest(expert.name)
        if entry:
            versions[expert.name] = entry["version"]
    if not versions:
        raise LorafleetError(
            f"registry {reader.uri}: no expert of fleet {spec.name!r} has a registered adapter"
        )
    return versions


def trained_base(
    spec: FleetSpec,
    adapters: dict[str, str],
    registry: LocationLike | None = None,
    storage: Storage | None = None,
) -> str:
    """The base folder the served adapter versions were trained on, from their lineage.

    A demo base (``base.model: demo``) is built by the pipeline and is on no hub: serving it
    means serving that folder.

    Args:
        spec: the fleet.
        adapters: expert name -> version (see :func:`resolve_adapters`).
        registry: the registry to read (default: ``spec.registry.uri``).
        storage: the storage layer (default: configured from the environment).

    Returns:
        The base model path every served version's ``lineage.json`` names.

    Raises:
        LorafleetError: if the versions name no base, or different ones.
    """
    reader = Registry(registry or spec.registry.uri, storage)
    bases = {
        expert: str(reader.lineage(expert, version).get("base", {}).get("model") or "")
        for expert, version in adapters.items()
    }
    found = set(bases.values())
    if len(found) != 1 or "" in found:
        shown = ", ".join(f"{e} {adapters[e]}: {b or 'none'}" for e, b in bases.items())
        raise LorafleetError(
            f"registry {reader.uri}: the served versions do not name one base ({shown}); "
            "set serving.base_uri"
        )
    return found.pop()


def _is_folder(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


# KServe's hf:// storage URI: exactly one '/' between owner and model, then the revision the
# storage initializer passes to snapshot_download (Storage._download_hf, kserve_storage.py).
KSERVE_HF_URI = re.compile(r"^hf://[\w.-]+/[\w.-]+(:[^/\s]+)?$")


def _base_uri(spec: FleetSpec, default_base: str | None) -> str | None:
    """The base's URI: ``serving.base_uri``, else ``default_base``, else a hub base as
    ``hf://OWNER/MODEL:REVISION`` (pinned to ``base.revision`` when set) or a local base's
    folder; ``None`` for a demo base nobody has located (it is on no hub)."""
    if spec.serving.base_uri or default_base:
        return spec.serving.base_uri or default_base
    base = spec.base
    if base.model == "demo":
        return None
    if base.hub_id is None:  # a folder: the local profile mounts it, others refuse it
        return base.model
    return f"hf://{base.hub_id}" + (f":{base.revision}" if base.revision else "")


def _hub_uri_problem(spec: FleetSpec, uri: str) -> tuple[str, str] | None:
    """Why KServe's storage initializer could not read the ``hf://`` base ``uri``, if so."""
    if KSERVE_HF_URI.match(uri):
        return None
    form = "KServe reads a hub base as hf://OWNER/MODEL[:REVISION]"
    if spec.serving.base_uri:
        return ("serving.base_uri", f"{uri!r}: {form}")
    if "/" in (spec.base.revision or ""):
        return (
            "base.revision",
            f"{spec.base.revision!r}: {form}, with no '/' in the revision; pin the commit sha",
        )
    return (
        "base.model",
        f"{spec.base.model!r}: {form}; name the owner too (OWNER/MODEL), or set serving.base_uri",
    )


def deployment_annotations(serving: ServingSpec) -> dict[str, str]:
    """The InferenceService's mode annotations, in the names KServe >= 0.16 validates.

    KServe's validating webhook reads the legacy ``RawDeployment`` value as Knative and checks
    the scale metric against the KPA's list (refusing cpu and memory); ``Standard`` with the
    ``hpa`` autoscaler class is checked, and reconciled, as the HPA it becomes.
    """
    if serving.deployment_mode == "Serverless":
        return {f"{KSERVE}/deploymentMode": "Knative"}
    return {f"{KSERVE}/deploymentMode": "Standard", f"{KSERVE}/autoscalerClass": "hpa"}


def _demo_base_problem(profile: Profile) -> tuple[str, str]:
    where = (
        "or register a version whose lineage names it"
        if profile.host_folders
        else "where the cluster can read it"
    )
    return (
        "serving.base_uri",
        f"required for profile {profile.name}: base.model demo is built by the pipeline and "
        f"is on no hub (give the built base's URI, {where})",
    )


def _uri_problems(
    spec: FleetSpec, profile: Profile, default_base: str | None
) -> list[tuple[str, str]]:
    """Storage URIs the profile's pods cannot read, as ``(field, message)``."""
    serving = spec.serving
    adapters = serving.adapter_store or spec.registry.uri
    base = _base_uri(spec, default_base)
    problems = []
    if base is None and not profile.host_folders:
        # On a local cluster render finds it in the registry (trained_base); here nothing can.
        problems.append(_demo_base_problem(profile))
    hub = _hub_uri_problem(spec, base) if base and base.startswith("hf://") else None
    if hub:
        problems.append(hub)
    uris = [("serving.base_uri", base)] if base else []
    for field, uri in [*uris, ("serving.adapter_store", adapters)]:
        if profile.host_folders and _is_folder(uri):
            if not Path(uri.removeprefix("file://")).is_absolute():
                problems.append(
                    (field, f"{uri!r}: profile {profile.name} mounts host folders by absolute path")
                )
            continue
        scheme = uri.split("://", 1)[0] if "://" in uri else ""
        if scheme not in profile.schemes:
            folders = ", local folders" if profile.host_folders else ""
            problems.append(
                (
                    field,
                    f"{uri!r} cannot be read on profile {profile.name} "
                    f"(schemes: {', '.join(s + '://' for s in profile.schemes)}{folders})",
                )
            )
    if adapters.startswith("hf://"):
        problems.append(
            ("serving.adapter_store", "the adapter store must be a bucket or PVC, not hf://")
        )
    return problems


def serving_problems(
    spec: FleetSpec, profile: str | None = None, default_base: str | None = None
) -> list[tuple[str, str]]:
    """Everything in the spec that :func:`render` would refuse, as ``(field, message)``.

    Args:
        spec: the fleet.
        profile: the cluster profile (default: ``spec.serving.profile``).
        default_base: the base URI when ``serving.base_uri`` is empty (see :func:`render`);
            without it a demo base on the local profile is not checked: ``deploy render``
            finds it in the registry (:func:`trained_base`).

    Returns:
        One entry per problem, in spec order; empty when the spec renders.
    """
    name = profile or spec.serving.profile
    if name not in PROFILES:
        return [("serving.profile", f"{name!r}: expected one of {', '.join(PROFILES)}")]
    prof = PROFILES[name]
    view = spec.on_profile(name)
    identity = identity_problem(prof, view.serving)
    problems = [
        *_name_problems(view),
        *([identity] if identity else []),
        *_uri_problems(view, prof, default_base),
    ]
    return [(profile_field(spec, name, field), message) for field, message in problems]


def profile_field(spec: FleetSpec, profile: str, field: str) -> str:
    """Where ``field`` of the serving block is set for ``profile``: under
    ``serving.profiles.<profile>`` when that entry gives it, else ``field`` itself.

    Example: ``serving.storage.role_arn`` is ``serving.profiles.aws.storage.role_arn`` for a
    spec whose ``serving.profiles.aws`` sets ``storage``.
    """
    own = spec.serving.profiles.get(profile)
    parts = field.split(".")
    if own is None or parts[0] != "serving" or len(parts) < 2:
        return field
    if getattr(own, parts[1], None) is None:
        return field
    return ".".join(["serving", "profiles", profile, *parts[1:]])


def serving_warnings(spec: FleetSpec, profile: str | None = None) -> list[tuple[str, str]]:
    """What :func:`render` renders but a reader should know, as ``(field, message)``.

    Args:
        spec: the fleet.
        profile: the cluster profile (default: ``spec.serving.profile``).

    Returns:
        One entry per warning (one line each); empty when there is nothing to say.
    """
    name = profile or spec.serving.profile
    return [
        (profile_field(spec, name, field), message)
        for field, message in _warnings(spec.on_profile(name))
    ]


def _warnings(spec: FleetSpec) -> list[tuple[str, str]]:
    serving = spec.serving
    warnings = []
    if serving.runtime == "vllm" and serving.gpus == 0:
        warnings.append(
            (
                "serving.gpus",
                f"0 with runtime vllm: served by vLLM's CPU build ({VLLM_CPU_IMAGE}), "
                "many times slower than a GPU; for tests and small bases",
            )
        )
    if not serving.base_uri and spec.base.hub_id and not spec.base.revision:
        warnings.append(
            (
                "base.revision",
                "unset: every serving pod downloads the hub's main of the day, not "
                "necessarily the weights the adapters were trained on; pin the commit sha",
            )
        )
    return warnings


# KServe's InferenceService name rule (IsvcNameFmt, inference_service_validation.go): a
# DNS-1123 label that starts with a letter.
ISVC_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _name_problems(spec: FleetSpec) -> list[tuple[str, str]]:
    problems = []
    if not ISVC_NAME.match(spec.name) or len(spec.name) > 63:
        problems.append(
            (
                "name",
                f"{spec.name!r}: KServe names the InferenceService after the fleet and needs a "
                "lower-case DNS label starting with a letter",
            )
        )
    if spec.canary.mode == "revision" and spec.serving.deployment_mode != "Serverless":
        problems.append(
            (
                "canary.mode",
                "revision canaries need serving.deployment_mode: Serverless (KServe's "
                "RawDeployment has no revisions); use mode: router",
            )
        )
    return problems


def _resources(spec: FleetSpec) -> k8s.V1ResourceRequirements:
    gpus = spec.serving.gpus
    # vLLM keeps the base weights and the KV cache on the GPU but pins host memory per GPU.
    cpu, memory = ("4", "32Gi") if spec.serving.runtime == "vllm" else ("2", "8Gi")
    requests = {"cpu": str(max(1, int(cpu) // 2)), "memory": memory}
    limits = {"cpu": cpu, "memory": memory}
    if gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(gpus)
    return k8s.V1ResourceRequirements(requests=requests, limits=limits)


def _probes() -> dict[str, k8s.V1Probe]:
    """Probes on the lorafleet health endpoints, which the runtime, the vLLM front (ready once
    vLLM is up and every startup adapter is loaded) and the router all serve."""
    ready, live = "/v2/health/ready", "/v2/health/live"

    def probe(path: str, period: int, failures: int) -> k8s.V1Probe:
        return k8s.V1Probe(
            http_get=k8s.V1HTTPGetAction(path=path, port=PORT),
            period_seconds=period,
            timeout_seconds=5,
            failure_threshold=failures,
        )

    # Loading an 8B base can take minutes: the startup probe allows 30 min before liveness starts.
    return {
        "startup_probe": probe(ready, 10, 180),
        "readiness_probe": probe(ready, 10, 3),
        "liveness_probe": probe(live, 20, 3),
    }


def _scratch() -> tuple[list[k8s.V1Volume], list[k8s.V1VolumeMount]]:
    """Writable scratch space: the root filesystem is read-only."""
    names = {"tmp": "/tmp", "cache": "/home/lorafleet/.cache"}
    volumes = [k8s.V1Volume(name=n, empty_dir=k8s.V1EmptyDirVolumeSource()) for n in names]
    mounts = [k8s.V1VolumeMount(name=n, mount_path=p) for n, p in names.items()]
    return volumes, mounts


def _admin_token(spec: FleetSpec) -> k8s.V1EnvVar:
    """``LORAFLEET_ADMIN_TOKEN`` from the fleet's admin Secret ``FLEET-router-admin``, the one
    the rollout controller calls with (:mod:`lorafleet.rollout.manifests`); optional."""
    return k8s.V1EnvVar(
        name="LORAFLEET_ADMIN_TOKEN",
        value_from=k8s.V1EnvVarSource(
            secret_key_ref=k8s.V1SecretKeySelector(
                name=f"{spec.name}-router-admin", key="token", optional=True
            )
        ),
    )


def _serving_runtime(spec: FleetSpec) -> Any:
    from kserve import models as ks

    runtime = spec.serving.runtime
    volumes, mounts = _scratch()
    env = [
        k8s.V1EnvVar(name="HOME", value="/home/lorafleet"),
        k8s.V1EnvVar(name="HF_HUB_OFFLINE", value="1"),
        # The admin API (adapter loads of router-mode canaries) of either runtime.
        _admin_token(spec),
    ]
    if runtime == "vllm":
        # lorafleet's front on :8080 (admission checks, routes, faults, per-adapter metrics,
        # the admin API); vLLM behind it on a Unix socket, its flags passed through.
        image = VLLM_IMAGE if spec.serving.gpus else VLLM_CPU_IMAGE
        fmt = "vllm"
        command = ["python3", "-m", "lorafleet.serve.vllm_front"]
        args = [
            *("--host", "0.0.0.0", "--port", str(PORT)),
            *("--model", BASE_MOUNT, "--served-model-name", "base"),
        ]
        if spec.serving.gpus > 1:
            # vLLM's tensor-parallel workers exchange through shared memory (NCCL, its
            # message queues): a container's /dev/shm is 64 MiB.
            shm = k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=VLLM_SHM_SIZE)
            volumes.append(k8s.V1Volume(name="dshm", empty_dir=shm))
            mounts.append(k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"))
    else:
        image, fmt = RUNTIME_IMAGE, "lorafleet"
        command = ["python", "-m", "lorafleet.serve.runtime"]
        args = ["--host", "0.0.0.0", "--port", str(PORT), "--base", BASE_MOUNT]
    container = k8s.V1Container(
        name="kserve-container",
        image=image,
        command=command,
        args=args,
        env=env,
        ports=[k8s.V1ContainerPort(container_port=PORT, name="http", protocol="TCP")],
        security_context=container_security_context(),
        volume_mounts=mounts,
        **_probes(),
    )
    return ks.V1alpha1ServingRuntime(
        api_version=f"{KSERVE}/v1alpha1",
        kind="ServingRuntime",
        metadata=object_meta(spec, f"lorafleet-{runtime}", "runtime"),
        spec=ks.V1alpha1ServingRuntimeSpec(
            supported_model_formats=[
                ks.V1alpha1SupportedModelFormat(name=fmt, version="1", auto_select=True)
            ],
            protocol_versions=["v2"],
            containers=[container],
            volumes=volumes,
        ),
    )


def _model_args(spec: FleetSpec, adapters: dict[str, str]) -> list[str]:
    """The predictor's arguments, appended by KServe to the ServingRuntime's.

    Adapters are always the lorafleet ``--adapter NAME=PATH`` (checked before they are
    served), never vLLM's ``--lora-modules``; with vLLM the rest are vLLM's own flags.
    """
    serving = spec.serving
    if serving.runtime == "vllm":
        # Room for a canary version next to every production one (router-mode rollouts
        # load EXPERT-VERSION beside EXPERT); --max-cpu-loras defaults to the same.
        args = [
            "--enable-lora",
            *("--max-loras", str(2 * len(adapters))),
            *("--max-lora-rank", str(serving.max_lora_rank)),
            *("--max-num-seqs", str(serving.max_batch_size)),
        ]
        if serving.gpus > 1:  # one model sharded over the pod's GPUs
            args += ["--tensor-parallel-size", str(serving.gpus)]
        if not serving.gpus:
            args += ["--kv-cache-memory-bytes", VLLM_CPU_KV_CACHE]
    else:
        args = ["--max-batch-size", str(serving.max_batch_size)]
    for name, version in adapters.items():
        args += ["--adapter", f"{name}={ADAPTER_MOUNT}/{name}/{version}"]
    return args


def _pod_placement(spec: FleetSpec, profile: Profile) -> dict[str, Any]:
    serving = spec.serving
    if not serving.gpus:
        return {}
    selector = (
        serving.node_selector if serving.node_selector is not None else profile.gpu_node_selector
    )
    if serving.tolerations is not None:
        tolerations = [
            k8s.V1Toleration(**t.model_dump(exclude_none=True)) for t in serving.tolerations
        ]
    else:
        tolerations = [k8s.V1Toleration(**t) for t in profile.gpu_tolerations]
    return {"node_selector": selector or None, "tolerations": tolerations or None}


def _model_storage(
    spec: FleetSpec, profile: Profile, default_base: str | None
) -> tuple[list[Any], list[k8s.V1Volume], list[k8s.V1VolumeMount]]:
    """Where the base and the adapters come from: KServe ``storageUris``, or (local folders
    on a profile with ``host_folders``) read-only ``hostPath`` volumes at the same mounts."""
    from kserve import models as ks

    uris, volumes, mounts = [], [], []
    sources = (
        ("base", _base_uri(spec, default_base) or "", BASE_MOUNT),
        ("adapters", spec.serving.adapter_store or spec.registry.uri, ADAPTER_MOUNT),
    )
    for name, uri, mount in sources:
        if profile.host_folders and _is_folder(uri):
            path = os.path.normpath(uri.removeprefix("file://"))  # the node's path: no ".."
            volumes.append(
                k8s.V1Volume(
                    name=name, host_path=k8s.V1HostPathVolumeSource(path=path, type="Directory")
                )
            )
            mounts.append(k8s.V1VolumeMount(name=name, mount_path=mount, read_only=True))
        else:
            uris.append(ks.V1beta1StorageUri(uri=uri, mount_path=mount))
    return uris, volumes, mounts


def _inference_service(
    spec: FleetSpec, profile: Profile, adapters: dict[str, str], default_base: str | None
) -> Any:
    from kserve import models as ks

    serving = spec.serving
    storage_uris, host_volumes, host_mounts = _model_storage(spec, profile, default_base)
    auto = serving.autoscaling
    volumes, mounts = _scratch()
    predictor = ks.V1beta1PredictorSpec(
        service_account_name=SERVING_SA,
        min_replicas=auto.min_replicas,
        max_replicas=auto.max_replicas,
        scale_metric=auto.scale_metric,
        scale_target=auto.scale_target,
        canary_traffic_percent=serving.canary_traffic_percent,
        storage_uris=storage_uris or None,
        volumes=host_volumes or None,
        # No name: KServe >= 0.16 refuses one in a standard predictor (validatePredictor in
        # inference_service_validation.go), and the SDK's default is ''.
        model=ks.V1beta1ModelSpec(
            name=None,
            model_format=ks.V1beta1ModelFormat(
                name="vllm" if serving.runtime == "vllm" else "lorafleet"
            ),
            runtime=f"lorafleet-{serving.runtime}",
            args=_model_args(spec, adapters),
            resources=_resources(spec),
            volume_mounts=host_mounts or None,
        ),
        security_context=pod_security_context(),
        **_pod_placement(spec, profile),
    )
    transformer = None
    if serving.router:
        container = k8s.V1Container(
            name="kserve-container",
            image=RUNTIME_IMAGE,
            command=["python", "-m", "lorafleet.serve.router"],
            # KServe appends --model_name, --predictor_host and --http_port.
            args=["--host", "0.0.0.0"],
            env=[_admin_token(spec)],
            ports=[k8s.V1ContainerPort(container_port=PORT, name="http", protocol="TCP")],
            resources=k8s.V1ResourceRequirements(
                requests={"cpu": "250m", "memory": "256Mi"}, limits={"cpu": "1", "memory": "512Mi"}
            ),
            security_context=container_security_context(),
            volume_mounts=mounts,
            **_probes(),
        )
        transformer = ks.V1beta1TransformerSpec(
            containers=[container],
            volumes=volumes,
            min_replicas=auto.min_replicas,
            max_replicas=auto.max_replicas,
            security_context=predictor.security_context,
        )
    return ks.V1beta1InferenceService(
        api_version=f"{KSERVE}/v1beta1",
        kind="InferenceService",
        metadata=object_meta(spec, spec.name, "inference", deployment_annotations(serving)),
        spec=ks.V1beta1InferenceServiceSpec(predictor=predictor, transformer=transformer),
    )


def _selector(spec: FleetSpec, component: str | None = None) -> k8s.V1LabelSelector:
    """Pods of the InferenceService (of one component), as KServe labels them."""
    labels = {f"{KSERVE}/inferenceservice": spec.name}
    if component:
        labels["component"] = component
    return k8s.V1LabelSelector(match_labels=labels)


def _rbac(spec: FleetSpec, meta) -> list[Any]:
    role = k8s.V1Role(
        api_version="rbac.authorization.k8s.io/v1",
        kind="Role",
        metadata=meta(PIPELINE_SA, "rbac"),
        rules=[
            # The pipeline's deploy step creates and updates the fleet's ISVC and runtimes,
            # and the canary step patches canaryTrafficPercent; nothing is ever deleted.
            k8s.V1PolicyRule(
                api_groups=[KSERVE],
                resources=["inferenceservices", "servingruntimes"],
                verbs=["get", "list", "watch", "create", "update", "patch"],
            ),
            k8s.V1PolicyRule(
                api_groups=[KSERVE], resources=["inferenceservices/status"], verbs=["get"]
            ),
            # Readiness and rollout diagnostics.
            k8s.V1PolicyRule(
                api_groups=[""], resources=["pods", "events"], verbs=["get", "list", "watch"]
            ),
        ],
    )
    binding = k8s.V1RoleBinding(
        api_version="rbac.authorization.k8s.io/v1",
        kind="RoleBinding",
        metadata=meta(PIPELINE_SA, "rbac"),
        role_ref=k8s.V1RoleRef(
            api_group="rbac.authorization.k8s.io", kind="Role", name=PIPELINE_SA
        ),
        subjects=[
            k8s.RbacV1Subject(
                kind="ServiceAccount", name=PIPELINE_SA, namespace=spec.serving.namespace
            )
        ],
    )
    return [role, binding]


def _training_rbac(spec: FleetSpec) -> list[Any]:
    """Role and RoleBinding ``lorafleet-pipeline-training`` in each namespace of a trainjob expert.

    The pipeline's ``train`` step (:func:`lorafleet.train.cluster.run_on_cluster`) runs as
    the pipeline ServiceAccount and creates the job in ``training.cluster.namespace``, then
    reads it until it ends. API discovery of ``trainer.kubeflow.org`` needs no grant: the
    built-in ``system:discovery`` ClusterRole allows it to every authenticated user.

    Args:
        spec: the fleet.

    Returns:
        Role, RoleBinding per distinct namespace (in expert order); none when no expert
        uses ``training.launcher: trainjob``.
    """
    # launcher trainjob comes with a cluster block (TrainingSettings checks it).
    namespaces = dict.fromkeys(
        e.training.cluster.namespace for e in spec.experts if e.training.launcher == "trainjob"
    )
    objects: list[Any] = []
    for namespace in namespaces:
        meta = object_meta(spec, TRAINING_ROLE, "training", namespace=namespace)
        role = k8s.V1Role(
            api_version="rbac.authorization.k8s.io/v1",
            kind="Role",
            metadata=meta,
            rules=[
                # The step creates the job (a TrainJob, or a PyTorchJob where Kubeflow Trainer is
                # absent) and reads it by name until it ends; a retried step gets the job it
                # created before (the name is a hash of the inputs). It deletes the job when the
                # step fails or is cancelled, so its GPUs are freed. Jobs are never listed,
                # watched or updated.
                k8s.V1PolicyRule(
                    api_groups=["trainer.kubeflow.org"],
                    resources=["trainjobs"],
                    verbs=["get", "create", "delete"],
                ),
                k8s.V1PolicyRule(
                    api_groups=["kubeflow.org"],
                    resources=["pytorchjobs"],
                    verbs=["get", "create", "delete"],
                ),
                # Diagnostics of the job's pods.
                k8s.V1PolicyRule(
                    api_groups=[""], resources=["pods", "events"], verbs=["get", "list", "watch"]
                ),
            ],
        )
        binding = k8s.V1RoleBinding(
            api_version="rbac.authorization.k8s.io/v1",
            kind="RoleBinding",
            metadata=meta,
            role_ref=k8s.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="Role", name=TRAINING_ROLE
            ),
            subjects=[
                k8s.RbacV1Subject(
                    kind="ServiceAccount", name=PIPELINE_SA, namespace=spec.serving.namespace
                )
            ],
        )
        objects += [role, binding]
    return objects


def render(
    spec: FleetSpec, profile: str, adapters: dict[str, str], default_base: str | None = None
) -> list[dict[str, Any]]:
    """Every object that serves ``spec`` on a cluster of the given profile.

    Args:
        spec: the fleet; its ``serving.profiles`` entry for ``profile``, if any, applies.
        profile: aws, gcp, onprem, or local (a kind or minikube cluster on this machine:
            local folders are mounted from the node by ``hostPath``, no storage identity).
        adapters: expert name -> adapter version (see :func:`resolve_adapters`).
        default_base: the base URI when ``serving.base_uri`` is empty (default
            ``hf://<base.model>:<base.revision>``); for a demo base, the folder
            :func:`trained_base` finds.

    Returns:
        Plain manifests (dicts), in apply order: ServiceAccounts (the serving one lists
        ``base.hub_token_secret`` when the base comes from the hub, for KServe's storage
        initializer), RBAC, the training RBAC
        (Role and RoleBinding ``lorafleet-pipeline-training`` in each ``training.cluster.namespace``
        of the experts with ``training.launcher: trainjob``), ServingRuntime, InferenceService,
        PodDisruptionBudget, NetworkPolicy, ServiceMonitor; then the canary rollout controller
        (:mod:`lorafleet.rollout.manifests`) when ``canary.handoff`` is ``controller``, or
        only its Role and RoleBinding (for the pipeline's ServiceAccount) when it is ``drive``.

    Raises:
        LorafleetError: if the spec does not fit the profile (:func:`serving_problems`), one
            line per problem.
    """
    problems = serving_problems(spec, profile, default_base)
    if not problems and _base_uri(spec.on_profile(profile), default_base) is None:
        field, message = _demo_base_problem(PROFILES[profile])
        problems = [(profile_field(spec, profile, field), message)]
    spec = spec.on_profile(profile)
    if problems:
        raise LorafleetError("\n".join(f"{field}: {message}" for field, message in problems))
    prof = PROFILES[profile]
    annotations, secrets = service_account_metadata(prof, spec.serving)
    hub_token = spec.base.hub_token_secret
    if hub_token and (_base_uri(spec, default_base) or "").startswith("hf://"):
        # KServe's storage initializer gets HF_TOKEN from a Secret its ServiceAccount lists.
        secrets = [*secrets, hub_token]

    def meta(name: str, component: str, ann: dict | None = None) -> k8s.V1ObjectMeta:
        return object_meta(spec, name, component, ann)

    objects: list[Any] = [
        k8s.V1ServiceAccount(
            api_version="v1",
            kind="ServiceAccount",
            metadata=meta(SERVING_SA, "serving", annotations),
            secrets=[k8s.V1ObjectReference(name=s) for s in secrets] or None,
            automount_service_account_token=False,
        ),
        k8s.V1ServiceAccount(
            api_version="v1", kind="ServiceAccount", metadata=meta(PIPELINE_SA, "pipeline")
        ),
        *_rbac(spec, meta),
        *_training_rbac(spec),
        _serving_runtime(spec),
        _inference_service(spec, prof, adapters, default_base),
        k8s.V1PodDisruptionBudget(
            api_version="policy/v1",
            kind="PodDisruptionBudget",
            metadata=meta(f"{spec.name}-predictor", "inference"),
            spec=k8s.V1PodDisruptionBudgetSpec(
                max_unavailable=1, selector=_selector(spec, "predictor")
            ),
        ),
        k8s.V1NetworkPolicy(
            api_version="networking.k8s.io/v1",
            kind="NetworkPolicy",
            metadata=meta(spec.name, "inference"),
            spec=k8s.V1NetworkPolicySpec(
                pod_selector=_selector(spec),  # predictor and router transformer
                policy_types=["Ingress"],
                ingress=[
                    k8s.V1NetworkPolicyIngressRule(
                        _from=[
                            k8s.V1NetworkPolicyPeer(
                                namespace_selector=k8s.V1LabelSelector(
                                    match_expressions=[
                                        k8s.V1LabelSelectorRequirement(
                                            key="kubernetes.io/metadata.name",
                                            operator="In",
                                            values=[spec.serving.namespace, *INGRESS_NAMESPACES],
                                        )
                                    ]
                                )
                            )
                        ],
                        ports=[k8s.V1NetworkPolicyPort(port=PORT, protocol="TCP")],
                    )
                ],
            ),
        ),
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": meta(f"{spec.name}-predictor", "monitoring"),
            "spec": {
                "selector": _selector(spec, "predictor"),
                "namespaceSelector": {"matchNames": [spec.serving.namespace]},
                "endpoints": [{"targetPort": PORT, "path": "/metrics", "interval": "30s"}],
            },
        },
    ]
    manifests = k8s.ApiClient().sanitize_for_serialization(objects)
    if spec.canary.handoff == "controller":
        manifests += controller_objects(spec)
    elif (
        spec.canary.handoff == "drive"
    ):  # the deploy step drives the rollout itself: its grant only
        manifests += k8s.ApiClient().sanitize_for_serialization(
            rollout_rbac(spec, controller=False)
        )
    return manifests


def dump_yaml(objects: list[dict[str, Any]]) -> str:
    """A multi-document YAML stream, keys in model order."""
    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False)


def write_objects(objects: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write one ``<kind>-<name>.yaml`` file per object (atomically) and return the paths."""
    paths = []
    for obj in objects:
        name = f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
        paths.append(atomic_write_text(Path(out_dir) / name, dump_yaml([obj])))
    return paths
