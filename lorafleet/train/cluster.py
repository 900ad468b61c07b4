"""Multi-node training on Kubernetes: a Kubeflow Trainer TrainJob, or a PyTorchJob.

The job's pods run the same recipe as a laptop: ``torchrun --module lorafleet.train.job``
with ``nodes x gpus_per_node`` ranks; torchrun reads the rendezvous (master address and
port, node rank) from the ``PET_*`` variables that Kubeflow's torch runtime sets on every
node. The job file travels in the environment variable :data:`JOB_ENV`, so the pods need
no file from the submitter; base model, data and outputs live on the shared PVC of
``training.cluster.volume``. Jobs are submitted with ``resume: true``: when a preempted
node makes the job restart, the recipe continues from the last checkpoint on the PVC.

A hub base is not copied onto the PVC: the job's pods download it themselves into a Hugging
Face cache on that PVC (``HF_HOME`` = ``<mount_path>/huggingface``, shared by every node, every
restart and every later job on the volume), with the token of ``base.hub_token_secret``.

Objects are built from the official typed models (``kubeflow-trainer-api`` for
``trainer.kubeflow.org/v1alpha1`` TrainJob; ``kubeflow-training`` for the older
``kubeflow.org/v1`` PyTorchJob, used where the TrainJob API is absent) and sent with the
official ``kubernetes`` client's CustomObjectsApi. :func:`wait_for_job` polls the job and
reports every change of its conditions and child-job counts as one log line (the KFP
step's log when it runs in a pipeline step).
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from lorafleet.errors import LorafleetError
from lorafleet.fleet import HUB_TOKEN_KEY, TrainCluster, TrainingSettings, is_hub_id
from lorafleet.train.job import TrainJobConfig

__all__ = [
    "HUB_CACHE_DIR",
    "JOB_ENV",
    "PYTORCHJOB",
    "TRAINJOB",
    "JobKind",
    "TrainingJobFailed",
    "build_pytorchjob",
    "build_trainjob",
    "check_job_paths",
    "delete_job",
    "hub_env",
    "hub_token",
    "job_state",
    "run_on_cluster",
    "submit_job",
    "trainer_command",
    "trainjob_available",
    "wait_for_job",
]

log = logging.getLogger(__name__)

JOB_ENV = "LORAFLEET_TRAIN_JOB"
# Who owns the TrainJob's runtime patch: Kubeflow Trainer (>= 2.2) refuses a manager that is not
# a domain-prefixed path (apimachinery's IsDomainPrefixedPath), like Kueue's "kueue.x-k8s.io/manager".
PATCH_MANAGER = "lorafleet.io/pipeline"
RESTARTS = 3  # PyTorchJob restarts (backoffLimit); a TrainJob's come from its runtime's JobSet failure policy


@dataclass(frozen=True)
class JobKind:
    """A training job kind's API coordinates."""

    kind: str
    group: str
    version: str
    plural: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


TRAINJOB = JobKind("TrainJob", "trainer.kubeflow.org", "v1alpha1", "trainjobs")
PYTORCHJOB = JobKind("PyTorchJob", "kubeflow.org", "v1", "pytorchjobs")

_LABELS = {"app.kubernetes.io/managed-by": "lorafleet", "app.kubernetes.io/component": "train"}
SHM_VOLUME = "lorafleet-shm"  # a memory-backed /dev/shm (training.cluster.shm_size)
HUB_CACHE_DIR = "huggingface"  # HF_HOME of a hub base's job, under the volume's mount_path


class TrainingJobFailed(LorafleetError):
    """The cluster reported the training job failed, or it did not finish in time."""


def _cluster(training: TrainingSettings) -> TrainCluster:
    if training.launcher != "trainjob" or training.cluster is None:
        raise LorafleetError(
            "training.launcher: a cluster job needs launcher: trainjob and a training.cluster block"
        )
    return training.cluster


def check_job_paths(job: TrainJobConfig, cluster: TrainCluster) -> None:
    """Refuse a job whose files would not be on the shared volume of every node.

    Raises:
        LorafleetError: naming the first path outside ``cluster.volume.mount_path``.
    """
    root = PurePosixPath(cluster.volume.mount_path)
    paths = {
        # a hub base is downloaded by the job's pods (hub_env), not read from the volume
        "base_dir": None if is_hub_id(job.base_dir) else job.base_dir,
        "train_set": job.train_set,
        "output_dir": job.output_dir,
        "run_dir": job.run_dir,
    }
    for field, value in paths.items():
        if value is not None and not PurePosixPath(value).is_relative_to(root):
            raise LorafleetError(
                f"{field}: {value} is not under training.cluster.volume.mount_path {root}; "
                "every node must see it on the shared PVC"
            )


def trainer_command(training: TrainingSettings) -> list[str]:
    """The command each training node runs: torchrun over this node's ranks.

    ``--nnodes``/``--nproc-per-node`` come from the spec; the node rank, master address
    and port come from the ``PET_*`` variables of Kubeflow's torch runtime.
    """
    return [
        "torchrun",
        f"--nnodes={training.nodes}",
        f"--nproc-per-node={training.gpus_per_node}",
        "--module",
        "lorafleet.train.job",
        "--env",
        JOB_ENV,
    ]


def _job_json(job: TrainJobConfig) -> str:
    return json.dumps(
        job.model_copy(update={"resume": True}).model_dump(mode="json"), sort_keys=True
    )


def hub_env(job: TrainJobConfig, cluster: TrainCluster) -> dict[str, str]:
    """What a job's pods need to download a hub base: ``HF_HUB_OFFLINE=0`` (the image is
    offline for local runs) and ``HF_HOME`` on the job's volume (``<mount_path>/huggingface``),
    so its nodes share one download; empty for a base on the volume. The token comes apart,
    from a Secret (:func:`hub_token`)."""
    if not is_hub_id(job.base_dir):
        return {}
    home = PurePosixPath(cluster.volume.mount_path) / HUB_CACHE_DIR
    return {"HF_HUB_OFFLINE": "0", "HF_HOME": str(home)}


def hub_token(job: TrainJobConfig, hub_token_secret: str | None) -> str | None:
    """The Secret whose ``HF_TOKEN`` key a job's pods get, for a hub base only (optional in
    the pods: a public base needs none, and a gated one then fails with the hub's message)."""
    return hub_token_secret if is_hub_id(job.base_dir) else None


def build_trainjob(
    name: str, job: TrainJobConfig, training: TrainingSettings, hub_token_secret: str | None = None
) -> dict[str, Any]:
    """A ``trainer.kubeflow.org/v1alpha1`` TrainJob running ``job`` on the spec's nodes.

    Args:
        name: the TrainJob's name (a DNS-1123 label).
        job: the training job; its paths are on ``training.cluster.volume``, its base there
            too or a hub id (see :func:`hub_env`).
        training: the expert's training settings (``launcher: trainjob``).
        hub_token_secret: ``base.hub_token_secret``, for a hub base.

    Returns:
        The object as a JSON-ready dict.
    """
    from kubeflow_trainer_api import models as m

    cluster = _cluster(training)
    check_job_paths(job, cluster)
    node = "node"  # the replicated job and container of Kubeflow's torch runtimes
    resources = None
    if cluster.accelerator:
        quantity = m.IoK8sApimachineryPkgApiResourceQuantity(str(training.gpus_per_node))
        resources = m.IoK8sApiCoreV1ResourceRequirements(limits={cluster.accelerator: quantity})
    volumes = [
        m.IoK8sApiCoreV1Volume(
            name="lorafleet-data",
            persistentVolumeClaim=m.IoK8sApiCoreV1PersistentVolumeClaimVolumeSource(
                claimName=cluster.volume.claim
            ),
        )
    ]
    mounts = [
        m.IoK8sApiCoreV1VolumeMount(name="lorafleet-data", mountPath=cluster.volume.mount_path)
    ]
    if cluster.shm_size:  # DataLoader workers and NCCL outgrow a container's 64 MiB /dev/shm
        volumes.append(
            m.IoK8sApiCoreV1Volume(
                name=SHM_VOLUME,
                emptyDir=m.IoK8sApiCoreV1EmptyDirVolumeSource(
                    medium="Memory",
                    sizeLimit=m.IoK8sApimachineryPkgApiResourceQuantity(cluster.shm_size),
                ),
            )
        )
        mounts.append(m.IoK8sApiCoreV1VolumeMount(name=SHM_VOLUME, mountPath="/dev/shm"))
    env = [m.IoK8sApiCoreV1EnvVar(name=JOB_ENV, value=_job_json(job))]
    env += [m.IoK8sApiCoreV1EnvVar(name=var, value=v) for var, v in hub_env(job, cluster).items()]
    secret = hub_token(job, hub_token_secret)
    if secret:
        ref = m.IoK8sApiCoreV1SecretKeySelector(name=secret, key=HUB_TOKEN_KEY, optional=True)
        source = m.IoK8sApiCoreV1EnvVarSource(secretKeyRef=ref)
        env.append(m.IoK8sApiCoreV1EnvVar(name=HUB_TOKEN_KEY, valueFrom=source))
    pod = m.TrainerV1alpha1PodSpecPatch(
        volumes=volumes,
        containers=[m.TrainerV1alpha1ContainerPatch(name=node, volumeMounts=mounts)],
        nodeSelector=cluster.node_selector or None,
        tolerations=[
            m.IoK8sApiCoreV1Toleration(**t.model_dump(exclude_none=True))
            for t in cluster.tolerations
        ]
        or None,
        serviceAccountName=cluster.service_account,
    )
    patch = m.TrainerV1alpha1RuntimePatch(
        manager=PATCH_MANAGER,
        trainingRuntimeSpec=m.TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=m.TrainerV1alpha1JobSetTemplatePatch(
                spec=m.TrainerV1alpha1JobSetSpecPatch(
                    replicatedJobs=[
                        m.TrainerV1alpha1ReplicatedJobPatch(
                            name=node,
                            template=m.TrainerV1alpha1JobTemplatePatch(
                                spec=m.TrainerV1alpha1JobSpecPatch(
                                    template=m.TrainerV1alpha1PodTemplatePatch(spec=pod)
                                )
                            ),
                        )
                    ]
                )
            )
        ),
    )
    trainjob = m.TrainerV1alpha1TrainJob(
        apiVersion=TRAINJOB.api_version,
        kind=TRAINJOB.kind,
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name, namespace=cluster.namespace, labels=_LABELS | cluster.kueue_labels
        ),
        spec=m.TrainerV1alpha1TrainJobSpec(
            activeDeadlineSeconds=int(cluster.timeout_s),
            runtimeRef=m.TrainerV1alpha1RuntimeRef(name=cluster.runtime),
            trainer=m.TrainerV1alpha1Trainer(
                image=cluster.image,
                command=trainer_command(training),
                env=env,
                numNodes=training.nodes,
                numProcPerNode=training.gpus_per_node,
                resourcesPerNode=resources,
            ),
            runtimePatches=[patch],
        ),
    )
    return trainjob.to_dict()


def build_pytorchjob(
    name: str, job: TrainJobConfig, training: TrainingSettings, hub_token_secret: str | None = None
) -> dict[str, Any]:
    """A ``kubeflow.org/v1`` PyTorchJob (Training Operator) running ``job``: one Master, ``nodes - 1`` Workers.

    Args:
        name: the PyTorchJob's name (a DNS-1123 label).
        job: the training job; its paths are on ``training.cluster.volume``, its base there
            too or a hub id (see :func:`hub_env`).
        training: the expert's training settings (``launcher: trainjob``).
        hub_token_secret: ``base.hub_token_secret``, for a hub base.

    Returns:
        The object as a JSON-ready dict.
    """
    from kubeflow.training import models as m
    from kubernetes import client as k

    cluster = _cluster(training)
    check_job_paths(job, cluster)
    resources = None
    if cluster.accelerator:
        resources = k.V1ResourceRequirements(
            limits={cluster.accelerator: str(training.gpus_per_node)}
        )
    volumes = [
        k.V1Volume(
            name="lorafleet-data",
            persistent_volume_claim=k.V1PersistentVolumeClaimVolumeSource(
                claim_name=cluster.volume.claim
            ),
        )
    ]
    mounts = [k.V1VolumeMount(name="lorafleet-data", mount_path=cluster.volume.mount_path)]
    if cluster.shm_size:  # DataLoader workers and NCCL outgrow a container's 64 MiB /dev/shm
        shm = k.V1EmptyDirVolumeSource(medium="Memory", size_limit=cluster.shm_size)
        volumes.append(k.V1Volume(name=SHM_VOLUME, empty_dir=shm))
        mounts.append(k.V1VolumeMount(name=SHM_VOLUME, mount_path="/dev/shm"))
    env = [k.V1EnvVar(name=JOB_ENV, value=_job_json(job))]
    env += [k.V1EnvVar(name=var, value=v) for var, v in hub_env(job, cluster).items()]
    secret = hub_token(job, hub_token_secret)
    if secret:
        ref = k.V1SecretKeySelector(name=secret, key=HUB_TOKEN_KEY, optional=True)
        env.append(k.V1EnvVar(name=HUB_TOKEN_KEY, value_from=k.V1EnvVarSource(secret_key_ref=ref)))
    template = k.V1PodTemplateSpec(
        metadata=k.V1ObjectMeta(labels=_LABELS),
        spec=k.V1PodSpec(
            containers=[
                k.V1Container(
                    name="pytorch",  # the container name the Training Operator looks for
                    image=cluster.image,
                    command=trainer_command(training),
                    env=env,
                    resources=resources,
                    volume_mounts=mounts,
                )
            ],
            volumes=volumes,
            node_selector=cluster.node_selector or None,
            tolerations=[
                k.V1Toleration(**t.model_dump(exclude_none=True)) for t in cluster.tolerations
            ]
            or None,
            service_account_name=cluster.service_account,
        ),
    )
    replicas = {
        "Master": m.KubeflowOrgV1ReplicaSpec(
            replicas=1, restart_policy="OnFailure", template=template
        )
    }
    if training.nodes > 1:
        replicas["Worker"] = m.KubeflowOrgV1ReplicaSpec(
            replicas=training.nodes - 1, restart_policy="OnFailure", template=template
        )
    pytorchjob = m.KubeflowOrgV1PyTorchJob(
        api_version=PYTORCHJOB.api_version,
        kind=PYTORCHJOB.kind,
        metadata=k.V1ObjectMeta(
            name=name, namespace=cluster.namespace, labels=_LABELS | cluster.kueue_labels
        ),
        spec=m.KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(training.gpus_per_node),
            pytorch_replica_specs=replicas,
            # Restarts after a lost node resume from the last checkpoint; the deadline bounds the bill.
            run_policy=m.KubeflowOrgV1RunPolicy(
                backoff_limit=RESTARTS, active_deadline_seconds=int(cluster.timeout_s)
            ),
        ),
    )
    return k.ApiClient().sanitize_for_serialization(pytorchjob)


def trainjob_available(api) -> bool:
    """Whether the API server serves Kubeflow Trainer's ``trainjobs`` (API discovery).

    Args:
        api: a ``kubernetes.client.ApiClient``.
    """
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.exceptions import ApiException

    try:
        found = CustomObjectsApi(api).get_api_resources(TRAINJOB.group, TRAINJOB.version)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise LorafleetError(
            f"API discovery of {TRAINJOB.api_version}: the API server said {exc.status} {exc.reason}"
        ) from None
    return any(r.name == TRAINJOB.plural for r in found.resources or [])


def submit_job(
    api,
    name: str,
    job: TrainJobConfig,
    training: TrainingSettings,
    hub_token_secret: str | None = None,
) -> tuple[JobKind, dict[str, Any]]:
    """Create a TrainJob, or a PyTorchJob where the TrainJob API is absent.

    Args:
        api: a ``kubernetes.client.ApiClient``.
        name: the job's name.
        job: the training job.
        training: the expert's training settings (``launcher: trainjob``).
        hub_token_secret: ``base.hub_token_secret``, for a hub base.

    Returns:
        ``(kind, object as created)``.

    Raises:
        LorafleetError: naming the job and the API server's reason when creation fails
            (409: a job of that name exists).
    """
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.exceptions import ApiException

    kind = TRAINJOB if trainjob_available(api) else PYTORCHJOB
    build = build_trainjob if kind is TRAINJOB else build_pytorchjob
    body = build(name, job, training, hub_token_secret)
    namespace = body["metadata"]["namespace"]
    try:
        created = CustomObjectsApi(api).create_namespaced_custom_object(
            kind.group, kind.version, namespace, kind.plural, body
        )
    except ApiException as exc:
        raise LorafleetError(
            f"{kind.kind}/{name}: the API server said {exc.status} {exc.reason}"
        ) from None
    log.info("created %s/%s in %s", kind.kind, name, namespace)
    return kind, created


def job_state(obj: dict[str, Any]) -> tuple[str, str]:
    """The phase of a TrainJob or PyTorchJob and a one-line description of its status.

    Returns:
        ``(phase, line)``: phase is ``Succeeded``, ``Failed`` or ``Running`` / ``Pending``;
        the line lists the true conditions (``type: reason: message``) and, for a TrainJob,
        the child jobs' counts.
    """
    status = obj.get("status") or {}
    true = [c for c in status.get("conditions") or [] if c.get("status") == "True"]
    types = {c.get("type") for c in true}
    if "Failed" in types:
        phase = "Failed"
    elif types & {"Complete", "Succeeded"}:
        phase = "Succeeded"
    elif "Running" in types or any(j.get("active") for j in status.get("jobsStatus") or []):
        phase = "Running"
    else:
        phase = "Pending"
    parts = [
        ": ".join(str(x) for x in (c.get("type"), c.get("reason"), c.get("message")) if x)
        for c in true
    ]
    for j in status.get("jobsStatus") or []:
        counts = ", ".join(
            f"{k} {j[k]}" for k in ("active", "ready", "succeeded", "failed") if j.get(k)
        )
        parts.append(f"jobs {j.get('name')}: {counts or 'none yet'}")
    return phase, f"{phase} ({'; '.join(parts)})" if parts else phase


def wait_for_job(
    api,
    kind: JobKind,
    namespace: str,
    name: str,
    timeout_s: float,
    poll_s: float = 10.0,
    on_change: Callable[[str], None] | None = None,
) -> str:
    """Follow a training job until it succeeds; report every change of its status.

    Args:
        api: a ``kubernetes.client.ApiClient``.
        kind: :data:`TRAINJOB` or :data:`PYTORCHJOB`.
        namespace: the job's namespace.
        name: the job's name.
        timeout_s: how long to wait.
        poll_s: seconds between reads (the first few come sooner: 0.25 s, doubling).
        on_change: called with each new status line (default: the module's logger).

    Returns:
        The last status line (phase ``Succeeded``).

    Raises:
        TrainingJobFailed: the job failed (with the operator's reason and message), or did
            not succeed within ``timeout_s``.
    """
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.exceptions import ApiException

    report = on_change or (lambda line: log.info("%s/%s: %s", kind.kind, name, line))
    objects = CustomObjectsApi(api)
    deadline = time.monotonic() + timeout_s
    last = None
    delay = min(poll_s, 0.25)  # quick at first (a job that fails at once), then every poll_s
    while True:
        try:
            live = objects.get_namespaced_custom_object(
                kind.group, kind.version, namespace, kind.plural, name
            )
        except ApiException as exc:
            raise TrainingJobFailed(
                f"{kind.kind}/{name}: the API server said {exc.status} {exc.reason}"
            ) from None
        phase, line = job_state(live)
        if line != last:
            report(line)
            last = line
        if phase == "Succeeded":
            return line
        if phase == "Failed":
            raise TrainingJobFailed(f"{kind.kind}/{name} in {namespace} failed: {line}")
        if time.monotonic() >= deadline:
            raise TrainingJobFailed(
                f"{kind.kind}/{name} in {namespace}: not finished after {timeout_s:g} s ({line})"
            )
        time.sleep(delay)
        delay = min(poll_s, delay * 2)


def delete_job(api, kind: JobKind, namespace: str, name: str) -> None:
    """Delete a training job and, with it, its pods (foreground); one already gone is fine.

    A failure to delete is logged, not raised: the caller is already ending with the error
    that made it clean up.
    """
    from kubernetes.client import CustomObjectsApi, V1DeleteOptions
    from kubernetes.client.exceptions import ApiException

    try:
        CustomObjectsApi(api).delete_namespaced_custom_object(
            kind.group,
            kind.version,
            namespace,
            kind.plural,
            name,
            body=V1DeleteOptions(propagation_policy="Foreground"),
        )
    except ApiException as exc:
        if exc.status != 404:
            log.warning(
                "%s/%s in %s was not deleted (the API server said %s %s): delete it to free "
                "its GPUs",
                kind.kind,
                name,
                namespace,
                exc.status,
                exc.reason,
            )
        return
    log.info("deleted %s/%s in %s", kind.kind, name, namespace)


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit(143)`` while the block runs, so ``finally``/``except`` run.

    Kubeflow Pipelines cancels a run by deleting its pods: the kubelet sends SIGTERM, whose
    default action ends the process without unwinding. Only the main thread can take
    signals; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum: int, _frame) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stage_in(src: str | Path, dst: Path) -> Path:
    """Copy a file or directory onto the shared volume (replacing an earlier copy), atomically."""
    src = Path(src)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.unlink(missing_ok=True)
    shutil.copytree(src, tmp) if src.is_dir() else shutil.copyfile(src, tmp)
    if dst.is_dir():
        shutil.rmtree(dst)
    tmp.replace(dst)
    return dst


def run_on_cluster(
    name: str,
    base_dir: str | Path,
    train_set: str | Path,
    adapter_out: str | Path,
    job: TrainJobConfig,
    training: TrainingSettings,
    api=None,
    poll_s: float = 10.0,
    hub_token_secret: str | None = None,
) -> dict:
    """Train through a cluster job from a pipeline step, and bring the adapter back.

    The step's pod mounts ``training.cluster.volume`` at the same ``mount_path`` as the
    job's pods (``pipeline.profiles.<p>.steps.train.pvcs``). The base (a folder; a hub base
    is downloaded by the job's pods, :func:`hub_env`) and the training set are copied onto it
    under ``<mount_path>/lorafleet-jobs/<job name>/``; the job trains there and the adapter
    is copied back to ``adapter_out``. The job's name is a
    hash of its inputs and settings, so a retried step finds the job it started (a
    running one is followed, a finished one is not run again) and a restarted job
    resumes from its checkpoints on the volume. When the job fails or times out, or the step
    is cancelled (SIGTERM), the job is deleted so its GPUs are freed.

    Args:
        name: a readable prefix of the job name (the expert's name).
        base_dir: the base model directory, as this step sees it.
        train_set: the training records, as this step sees them.
        adapter_out: where the adapter goes, as this step sees it.
        job: the job's LoRA and training settings (its paths are replaced).
        training: the expert's training settings (``launcher: trainjob``).
        api: a ``kubernetes.client.ApiClient`` (default: :func:`kube_api`).
        poll_s: seconds between status reads.
        hub_token_secret: ``base.hub_token_secret``: the job's pods download a hub base with
            it (the Secret must be in ``training.cluster.namespace``).

    Returns:
        The run's result (``TrainResult.to_dict()``) as rank 0 wrote it.

    Raises:
        LorafleetError: the volume is not mounted in this step, the job could not be
            created, or it failed (:class:`TrainingJobFailed`).
    """
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.exceptions import ApiException

    from lorafleet.base import fingerprint_model
    from lorafleet.io import sha256_file, sha256_json

    cluster = _cluster(training)
    root = Path(cluster.volume.mount_path)
    if not root.is_dir():
        raise LorafleetError(
            f"training.cluster.volume: {root} is not mounted in this step; mount claim "
            f"{cluster.volume.claim!r} there (pipeline.profiles.<profile>.steps.train.pvcs)"
        )
    settings = job.model_dump(
        mode="json", include={"lora", "training", "base_revision", "base_dtype"}
    )
    digest = sha256_json(
        {
            "train": sha256_file(train_set),
            "base": fingerprint_model(base_dir, job.base_revision),
            "settings": settings,
        }
    )
    job_name = f"lorafleet-{name}"[:54].rstrip("-") + f"-{digest[:8]}"
    work = root / "lorafleet-jobs" / job_name
    work.mkdir(parents=True, exist_ok=True)
    # A folder is staged; a hub id stays one (Path(...).is_dir() decides, as fingerprint_model
    # does): the job's pods download it into the volume's shared Hugging Face cache.
    on_hub = is_hub_id(str(base_dir)) and not Path(base_dir).is_dir()
    inputs = {"train.jsonl": train_set} | ({} if on_hub else {"base": base_dir})
    if not (work / "inputs.sha256").is_file() or (work / "inputs.sha256").read_text() != digest:
        for dst, src in inputs.items():
            _stage_in(src, work / dst)
        (work / "inputs.sha256").write_text(digest)
    remote = job.model_copy(
        update={
            "base_dir": str(base_dir) if on_hub else str(work / "base"),
            "train_set": str(work / "train.jsonl"),
            "output_dir": str(work / "adapter"),
            "run_dir": str(work / "adapter.run"),
            "resume": True,
        }
    )
    if api is None:
        from lorafleet.kube import kube_api

        api = kube_api()
    report = lambda line: log.info("%s: %s", job_name, line)  # noqa: E731 (one line per status change)
    try:
        kind, created = submit_job(api, job_name, remote, training, hub_token_secret)
        namespace = created["metadata"]["namespace"]
        report(f"{kind.kind} created in {namespace}")
    except LorafleetError as exc:
        # A retried step: follow the job it created before (submit_job's 409), if it is there.
        kind = TRAINJOB if trainjob_available(api) else PYTORCHJOB
        namespace = cluster.namespace
        try:
            CustomObjectsApi(api).get_namespaced_custom_object(
                kind.group, kind.version, namespace, kind.plural, job_name
            )
        except ApiException:
            raise exc from None
        report(f"{kind.kind} exists in {namespace} (a retried step): following it")
    try:
        with sigterm_exits():
            wait_for_job(api, kind, namespace, job_name, cluster.timeout_s, poll_s, report)
    except BaseException:
        # Failed, timed out or cancelled: a job left running holds its nodes' GPUs. A retried
        # step creates it again and resumes from the checkpoints on the volume.
        delete_job(api, kind, namespace, job_name)
        raise
    result_file = work / "adapter.run" / "result.json"
    if not result_file.is_file():
        raise TrainingJobFailed(f"{kind.kind}/{job_name} succeeded but wrote no {result_file}")
    if Path(adapter_out).exists():
        shutil.rmtree(adapter_out)
    shutil.copytree(work / "adapter", adapter_out)
    return {
        **json.loads(result_file.read_text()),
        "adapter_dir": str(adapter_out),
        "cluster_job": f"{kind.kind}/{job_name}",
    }
