"""Kubernetes platform settings of the compiled pipeline, per cluster profile (kfp-kubernetes).

A fleet spec's ``pipeline.profiles.<profile>`` says where each step's pod runs: accelerator
type and count, node selector, tolerations, PVC mounts and Secret keys as environment
variables, and which object store the steps share. :func:`placer` turns one profile into
the ``place`` hook of :func:`~lorafleet.pipelines.fleet_pipeline.build_fleet_pipeline`; the
compiler writes the settings into the IR's ``platforms.kubernetes`` section (accelerators
and environment variables into each container).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kfp import kubernetes
from kfp.dsl import PipelineTask

from lorafleet.errors import LorafleetError, SpecError
from lorafleet.fleet import PlatformProfile, StepPlatform, load_fleet
from lorafleet.storage import PVC_MOUNTS_ENV

__all__ = ["S3_ENDPOINT_ENV", "apply_step_platform", "placer", "spec_profile", "step_env"]

# What botocore (and so lorafleet.storage) reads for the S3 endpoint of an S3-compatible store.
S3_ENDPOINT_ENV = "AWS_ENDPOINT_URL_S3"


def apply_step_platform(task: PipelineTask, settings: StepPlatform) -> PipelineTask:
    """Add one :class:`~lorafleet.fleet.StepPlatform`'s settings to ``task``.

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
    return task


def step_env(profile: PlatformProfile, step: str) -> dict[str, str]:
    """The environment the storage layer needs in ``step``'s pod on ``profile``.

    Args:
        profile: the platform settings of one cluster profile.
        step: the step (task) name.

    Returns:
        ``AWS_ENDPOINT_URL_S3`` when the profile's store has an S3 endpoint, and
        ``LORAFLEET_PVC_MOUNTS`` (``claim=/path,...``) when the pod mounts PVCs, so that
        ``pvc://`` locations resolve in the step.
    """
    env = {}
    if profile.storage.endpoint:
        env[S3_ENDPOINT_ENV] = profile.storage.endpoint
    mounts = profile.pvc_mounts(step)
    if mounts:
        env[PVC_MOUNTS_ENV] = ",".join(f"{claim}={path}" for claim, path in mounts.items())
    return env


def placer(profile: PlatformProfile) -> Callable[[PipelineTask], PipelineTask]:
    """The ``place`` hook for one profile: ``all_steps`` on every task, then the step's own,
    then the storage layer's environment (:func:`step_env`).

    Args:
        profile: the platform settings of one cluster profile.

    Returns:
        A function that configures a task by its step name (``task.name``).
    """

    def place(task: PipelineTask) -> PipelineTask:
        apply_step_platform(task, profile.all_steps)
        own = profile.steps.get(task.name)
        if own is not None:
            apply_step_platform(task, own)
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
    profiles = load_fleet(spec, check_files=False).pipeline.profiles
    if profile not in profiles:
        known = ", ".join(profiles) or "none"
        raise SpecError(
            spec, None, f"pipeline.profiles.{profile}", f"no such profile; the spec has: {known}"
        )
    return profiles[profile]
