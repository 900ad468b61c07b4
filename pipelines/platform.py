"""Kubernetes platform settings of the compiled pipeline, per cluster profile (kfp-kubernetes).

A fleet spec's ``pipeline.profiles.<profile>`` says where each step's pod runs: accelerator
type and count, node selector, tolerations, PVC mounts and Secret keys as environment
variables, CPU and memory, retries, a timeout, image pull policy and secrets, a
memory-backed ``/dev/shm``, a Kueue queue and priority, and which object store the steps
share. Every step starts from :data:`STEP_DEFAULTS` (its kind's resources and timeout;
retries on the idempotent steps; a ``/dev/shm`` for training). :func:`placer` turns one profile into
the ``place`` hook of :func:`~lorafleet.pipelines.fleet_pipeline.build_fleet_pipeline`; the
compiler writes the settings into the IR's ``platforms.kubernetes`` section (accelerators
and environment variables into each container).

The steps that load the base (:data:`~lorafleet.fleet.platform.BASE_STEPS`) may reach the
hub on a cluster, which the image's ``HF_HUB_OFFLINE=1`` forbids for local runs: they get
``HF_HUB_OFFLINE=0`` (unless the profile's ``model_cache`` is ``offline``), the base's
``hub_token_secret`` as ``HF_TOKEN``, and the ``model_cache`` PVC as ``HF_HOME``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kfp import kubernetes
from kfp.dsl import PipelineTask

from lorafleet.engine.devices import GPUS_ENV
from lorafleet.errors import LorafleetError, SpecError
from lorafleet.fleet import (
    HUB_TOKEN_KEY,
    PROFILE_ENV,
    BaseSpec,
    FleetSpec,
    PlatformProfile,
    StepPlatform,
    load_fleet,
)
from lorafleet.fleet.evaluation import pick_engine
from lorafleet.fleet.platform import (
    BASE_STEPS,
    KUEUE_PRIORITY_LABEL,
    KUEUE_QUEUE_LABEL,
    NEVER_RETRIED_STEPS,
)
from lorafleet.storage import PVC_MOUNTS_ENV

__all__ = [
    "DEFAULT_RETRIES",
    "HF_HOME_ENV",
    "HUB_OFFLINE_ENV",
    "S3_ENDPOINT_ENV",
    "SHM_VOLUME",
    "STEP_DEFAULTS",
    "apply_step_platform",
    "placer",
    "spec_profile",
    "step_env",
    "step_gpus",
    "step_settings",
    "step_shm",
    "vllm_evaluation_problem",
]

# What botocore (and so lorafleet.storage) reads for the S3 endpoint of an S3-compatible store.
S3_ENDPOINT_ENV = "AWS_ENDPOINT_URL_S3"
WORK_STORE_ENV = "LORAFLEET_WORK_STORE"  # read by lorafleet.stages.synthesize_stage
# What huggingface_hub (and transformers, vLLM) read: the cache root, and whether to stay off
# the hub (the component image sets 1, for local runs).
HF_HOME_ENV = "HF_HOME"
HUB_OFFLINE_ENV = "HF_HUB_OFFLINE"

# A failed pod of an idempotent step (evicted, preempted, a store's hiccup) is retried twice.
DEFAULT_RETRIES = 2
_BACKOFF = "30s"  # then 60 s: a preempted node's replacement has time to come up
SHM_VOLUME = "lorafleet-shm"  # the memory-backed emptyDir mounted at /dev/shm

_LIGHT = StepPlatform(
    cpu_request="500m", cpu_limit="1", memory_request="1Gi", memory_limit="1Gi",
    timeout_seconds=3600,
)  # fmt: skip
# Data steps hold a shard's records, MinHash signatures and great-expectations in memory.
_DATA = StepPlatform(
    cpu_request="1", cpu_limit="2", memory_request="4Gi", memory_limit="4Gi",
    timeout_seconds=4 * 3600,
)  # fmt: skip
# Base, smoke test and rollout steps load the base model's weights in host memory.
_MODEL = StepPlatform(
    cpu_request="2", cpu_limit="4", memory_request="16Gi", memory_limit="16Gi",
    timeout_seconds=2 * 3600,
)  # fmt: skip
# Training and evaluation load the base (an 8B model in bf16 is 16 GB) and feed the GPU.
_HEAVY = StepPlatform(
    cpu_request="4", cpu_limit="8", memory_request="32Gi", memory_limit="32Gi",
    timeout_seconds=6 * 3600,
)  # fmt: skip

STEP_DEFAULTS: dict[str, StepPlatform] = {
    "resolve-fleet": _LIGHT,
    "build-base": _MODEL,
    "expert-views": _LIGHT,
    "validate-data": _DATA,
    "plan-shards": _LIGHT,
    "synthesize": _DATA,
    "curate-shard": _DATA,
    "curate": _DATA,
    # DataLoader workers and NCCL (torchrun) pass tensors through /dev/shm.
    "train": _HEAVY.model_copy(update={"timeout_seconds": 24 * 3600, "shm_size": "8Gi"}),
    "evaluate": _HEAVY,
    "gate": _LIGHT,
    "register": _LIGHT,
    "reject": _LIGHT,
    "publish": _MODEL,
    "deploy": _MODEL,
    "fleet-status": _LIGHT,
}
"""Each step's resources and timeout before the profile's ``all_steps`` and its own settings."""


def apply_step_platform(task: PipelineTask, settings: StepPlatform) -> PipelineTask:
    """Add one :class:`~lorafleet.fleet.StepPlatform`'s settings to ``task``.

    Its ``shm_size`` is not applied here: a pod has one ``/dev/shm``, whichever layer of
    :func:`step_settings` sizes it last (:func:`step_shm`, applied by :func:`placer`).

    Args:
        task: a step of the pipeline, inside its pipeline definition.
        settings: the accelerator, node selector, tolerations, PVCs and secrets to add.

    Returns:
        ``task``, changed in place.
    """
    if settings.accelerator_type:
        task.set_accelerator_type(settings.accelerator_type).set_accelerator_limit(
            settings.accelerator_count
        )
    for label, value in settings.node_selector.items():
        kubernetes.add_node_selector(task, label_key=label, label_value=value)
    for tol in settings.tolerations:
        kubernetes.add_toleration(
            task, key=tol.key, operator=tol.operator, value=tol.value, effect=tol.effect
        )
    for pvc in settings.pvcs:
        kubernetes.mount_pvc(task, pvc_name=pvc.claim, mount_path=pvc.mount_path)
    for secret in settings.secrets:
        kubernetes.use_secret_as_env(
            task, secret_name=secret.secret, secret_key_to_env=dict(secret.env)
        )
    if settings.cpu_request:
        task.set_cpu_request(settings.cpu_request)
    if settings.cpu_limit:
        task.set_cpu_limit(settings.cpu_limit)
    if settings.memory_request:
        task.set_memory_request(settings.memory_request)
    if settings.memory_limit:
        task.set_memory_limit(settings.memory_limit)
    if settings.retries is not None:
        task.set_retry(settings.retries, backoff_duration=_BACKOFF, backoff_factor=2.0)
    if settings.timeout_seconds:
        kubernetes.set_timeout(task, settings.timeout_seconds)
    if settings.image_pull_policy:
        kubernetes.set_image_pull_policy(task, settings.image_pull_policy)
    if settings.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, settings.image_pull_secrets)
    # Kueue's pod integration holds a labelled pod until its queue admits it.
    if settings.queue_name:
        kubernetes.add_pod_label(task, KUEUE_QUEUE_LABEL, settings.queue_name)
    if settings.priority_class:
        kubernetes.add_pod_label(task, KUEUE_PRIORITY_LABEL, settings.priority_class)
    return task


def step_settings(profile: PlatformProfile, step: str) -> list[StepPlatform]:
    """The settings ``step`` gets on ``profile``, in the order they apply (later wins for
    single values; lists add up): its default, ``all_steps``, its own.

    The default retries come first for idempotent steps; register, publish, deploy and
    fleet-status get none, whatever ``all_steps`` says (the spec refuses them in their own
    settings).
    """
    default = STEP_DEFAULTS[step]
    shared = profile.all_steps
    if step in NEVER_RETRIED_STEPS:
        shared = shared.model_copy(update={"retries": None})
    else:
        default = default.model_copy(update={"retries": DEFAULT_RETRIES})
    own = profile.steps.get(step)
    return [default, shared, *([own] if own is not None else [])]


def step_gpus(profile: PlatformProfile, step: str) -> int:
    """How many GPUs ``step``'s pod gets on ``profile``: the accelerator count of the last
    settings (:func:`step_settings`) that name an accelerator, when that accelerator is a GPU
    (a resource name with ``gpu`` in it, e.g. ``nvidia.com/gpu``, ``amd.com/gpu``); else 0."""
    placed = [s for s in step_settings(profile, step) if s.accelerator_type]
    if not placed or "gpu" not in placed[-1].accelerator_type.lower():
        return 0
    return placed[-1].accelerator_count


def step_shm(profile: PlatformProfile, step: str) -> str | None:
    """The size of ``step``'s memory-backed ``/dev/shm`` on ``profile``: that of the last
    settings (:func:`step_settings`) that size it; ``None`` for the container's default."""
    sized = [s.shm_size for s in step_settings(profile, step) if s.shm_size]
    return sized[-1] if sized else None


def step_env(profile: PlatformProfile, step: str) -> dict[str, str]:
    """The environment lorafleet's storage layer and model loading need in ``step``'s pod on
    ``profile``.

    Args:
        profile: the platform settings of one cluster profile.
        step: the step (task) name.

    Returns:
        ``AWS_ENDPOINT_URL_S3`` when the profile's store has an S3 endpoint, and
        ``LORAFLEET_PVC_MOUNTS`` (``claim=/path,...``) when the pod mounts PVCs, so that
        ``pvc://`` locations resolve in the step, and ``LORAFLEET_WORK_STORE`` (the
        store's ``work/`` prefix) where a step keeps work it resumes after a retry;
        ``LORAFLEET_GPUS`` when the step is given GPUs (:func:`step_gpus`), so that it fails
        instead of running on the CPU when it sees none
        (:func:`lorafleet.engine.devices.require_gpus`); in the steps that load the base
        (:data:`~lorafleet.fleet.platform.BASE_STEPS`), ``HF_HUB_OFFLINE`` (``0``: a hub base
        may be fetched; ``1`` where the profile's ``model_cache`` is ``offline``) and
        ``HF_HOME`` (the ``model_cache`` mount) when the profile has a model cache;
        ``LORAFLEET_PROFILE`` (the profile's name), so that the steps read the spec's serving
        block as that profile sees it (its ``serving.profiles`` entry applied).
    """
    env = {PROFILE_ENV: profile.name} if profile.name else {}
    if profile.storage.endpoint:
        env[S3_ENDPOINT_ENV] = profile.storage.endpoint
    mounts = profile.pvc_mounts(step)
    if mounts:
        env[PVC_MOUNTS_ENV] = ",".join(f"{claim}={path}" for claim, path in mounts.items())
    if profile.storage.object_store:  # resumable work (teacher synthesis) survives a retry
        env[WORK_STORE_ENV] = f"{profile.storage.object_store.rstrip('/')}/work"
    gpus = step_gpus(profile, step)
    if gpus:
        env[GPUS_ENV] = str(gpus)
    if step in BASE_STEPS:
        cache = profile.model_cache
        env[HUB_OFFLINE_ENV] = "1" if cache and cache.offline else "0"
        if cache:
            env[HF_HOME_ENV] = cache.mount_path
    return env


def placer(
    profile: PlatformProfile, base: BaseSpec | None = None
) -> Callable[[PipelineTask], PipelineTask]:
    """The ``place`` hook for one profile: the step's defaults, ``all_steps``, the step's own
    (:func:`step_settings`), its ``/dev/shm`` (:func:`step_shm`), in the steps that load the
    base the model cache and the hub token, then the environment (:func:`step_env`).

    Args:
        profile: the platform settings of one cluster profile.
        base: the spec's base; its ``hub_token_secret`` becomes ``HF_TOKEN`` in the steps
            that load the base (optional: a pod whose Secret is missing still starts, and
            a gated base then fails with the hub's own message).

    Returns:
        A function that configures a task by its step name (``task.name``).
    """

    def place(task: PipelineTask) -> PipelineTask:
        for settings in step_settings(profile, task.name):
            apply_step_platform(task, settings)
        shm = step_shm(profile, task.name)
        if shm:
            kubernetes.empty_dir_mount(
                task, volume_name=SHM_VOLUME, mount_path="/dev/shm", medium="Memory", size_limit=shm
            )
        if task.name in BASE_STEPS:
            if profile.model_cache:
                kubernetes.mount_pvc(
                    task,
                    pvc_name=profile.model_cache.claim,
                    mount_path=profile.model_cache.mount_path,
                )
            if base is not None and base.hub_token_secret:
                kubernetes.use_secret_as_env(
                    task,
                    secret_name=base.hub_token_secret,
                    secret_key_to_env={HUB_TOKEN_KEY: HUB_TOKEN_KEY},
                    optional=True,
                )
        for name, value in step_env(profile, task.name).items():
            task.set_env_variable(name, value)
        return task

    return place


def spec_profile(spec: str | Path | None, profile: str) -> PlatformProfile:
    """The platform settings of ``profile`` in a fleet spec's ``pipeline.profiles``.

    Args:
        spec: the fleet spec file (``None`` is a usage mistake: a profile needs a spec).
        profile: the cluster profile (``aws``, ``gcp`` or ``onprem``).

    Returns:
        That profile's settings.

    Raises:
        LorafleetError: with no spec; SpecError if the spec is invalid or lacks the profile.
    """
    if spec is None:
        raise LorafleetError(
            f"--profile {profile} needs --spec: the profile's settings live in the fleet spec"
        )
    fleet = load_fleet(spec, check_files=False)
    profiles = fleet.pipeline.profiles
    if profile not in profiles:
        known = ", ".join(profiles) or "none"
        raise SpecError(
            spec, None, f"pipeline.profiles.{profile}", f"no such profile; the spec has: {known}"
        )
    problem = vllm_evaluation_problem(fleet, profile)
    if problem:
        raise SpecError(spec, None, *problem)
    return profiles[profile]


def vllm_evaluation_problem(fleet: FleetSpec, profile: str) -> tuple[str, str] | None:
    """Why the evaluate step on ``profile`` could not evaluate through vLLM, if so:
    experts whose gate evaluates through vLLM (:func:`~lorafleet.fleet.evaluation.pick_engine`,
    on the serving block as ``profile`` sees it) need the evaluate step to hold the serving
    pod's GPUs, over which vLLM splits the base.

    Returns:
        ``(field, message)``, or ``None`` when the step gets enough GPUs.
    """
    serving = fleet.on_profile(profile).serving
    through_vllm = [e.name for e in fleet.experts if pick_engine(e.gate.engine, serving) == "vllm"]
    have = step_gpus(fleet.pipeline.profiles[profile], "evaluate")
    if not through_vllm or have >= serving.gpus:
        return None
    return (
        f"pipeline.profiles.{profile}.steps.evaluate.accelerator_count",
        f"{have}: {', '.join(through_vllm)} evaluate through vLLM over serving.gpus "
        f"({serving.gpus}, --tensor-parallel-size): give the evaluate step that many GPUs "
        "(and a shm_size for its workers)",
    )
