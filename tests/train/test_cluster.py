"""Multi-node training jobs against kmock's KubernetesEmulator.

kmock stands in for the Kubernetes API server: it keeps objects in memory, answers API
discovery for the resources a test declares, and serves the official client's REST calls
(create, get, patch of /status, 404 and 409) as a server would. It runs no operator, so
each test moves the job's status itself through the emulator's /status subresource, as
Kubeflow Trainer (or the Training Operator) would while the pods run, and checks that
:func:`wait_for_job` reports each change and ends as the job does.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from kubernetes.client import ApiClient, Configuration, CustomObjectsApi

from lorafleet.errors import LorafleetError
from lorafleet.fleet import LoraSettings, TrainingSettings
from lorafleet.train.cluster import (
    JOB_ENV,
    PATCH_MANAGER,
    PYTORCHJOB,
    TRAINJOB,
    TrainingJobFailed,
    build_pytorchjob,
    build_trainjob,
    check_job_paths,
    run_on_cluster,
    sigterm_exits,
    submit_job,
    wait_for_job,
)
from lorafleet.train.job import TrainJobConfig

TRAINING = TrainingSettings(
    launcher="trainjob",
    nodes=2,
    gpus_per_node=4,
    max_steps=100,
    checkpoint_every=10,
    cluster={
        "image": "registry.example/lorafleet:0.1.0",
        "namespace": "ml-train",
        "volume": {"claim": "lorafleet-data", "mount_path": "/data"},
        "node_selector": {"gpu": "h100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "queue_name": "gpu-team",
        "priority_class": "gpu-high",
    },
)
KUEUE = {"kueue.x-k8s.io/queue-name": "gpu-team", "kueue.x-k8s.io/priority-class": "gpu-high"}
SHM = {"name": "lorafleet-shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}
JOB = TrainJobConfig(
    base_dir="/data/base",
    train_set="/data/job-analyzer/train.jsonl",
    output_dir="/data/job-analyzer/adapter",
    lora=LoraSettings(r=16, alpha=32),
    training=TRAINING,
)


def _api(kmock, *kinds):
    for kind in kinds:  # declared resources are what API discovery lists: the CRDs "installed"
        kmock.resources[f"{kind.group}/{kind.version}/{kind.plural}"] = kmock.ResourceInfo(
            namespaced=True,
            kind=kind.kind,
            singular=kind.kind.lower(),
            verbs={"create", "get", "list", "patch", "delete"},
            subresources={"status"},
        )
    return ApiClient(Configuration(host=str(kmock.url).rstrip("/")))


def _set_status(api, kind, name: str, status: dict) -> None:
    """What the operator does: write the job's status subresource."""
    CustomObjectsApi(api).patch_namespaced_custom_object_status(
        kind.group, kind.version, "ml-train", kind.plural, name, {"status": status}
    )


def _condition(kind: str, reason: str, message: str = "") -> dict:
    return {"type": kind, "status": "True", "reason": reason, "message": message}


async def test_a_trainjob_is_created_and_followed_until_it_completes(kmock) -> None:
    """Given a cluster serving trainer.kubeflow.org, when the expert's job is submitted and
    followed while the operator moves it Pending -> Running -> Complete, then a TrainJob with
    the spec's nodes, GPUs, image and volume exists, and every status change is reported."""
    with _api(kmock, TRAINJOB, PYTORCHJOB) as api:
        kind, created = await asyncio.to_thread(submit_job, api, "lf-job-analyzer", JOB, TRAINING)
        assert kind is TRAINJOB and created["kind"] == "TrainJob"

        live = await asyncio.to_thread(
            CustomObjectsApi(api).get_namespaced_custom_object,
            "trainer.kubeflow.org",
            "v1alpha1",
            "ml-train",
            "trainjobs",
            "lf-job-analyzer",
        )
        trainer = live["spec"]["trainer"]
        assert live["spec"]["runtimeRef"] == {"name": "torch-distributed"}
        assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (
            2,
            4,
            "registry.example/lorafleet:0.1.0",
        )
        assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "4"}}
        assert trainer["command"][:3] == ["torchrun", "--nnodes=2", "--nproc-per-node=4"]
        assert trainer["command"][3:] == ["--module", "lorafleet.train.job", "--env", JOB_ENV]
        shipped = TrainJobConfig.model_validate(
            json.loads(next(e["value"] for e in trainer["env"] if e["name"] == JOB_ENV))
        )
        assert shipped == JOB.model_copy(
            update={"resume": True}
        )  # a restarted job resumes from its checkpoint
        pod = live["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
            "replicatedJobs"
        ][0]["template"]["spec"]["template"]["spec"]
        # every node: the shared volume, and a memory-backed /dev/shm for DataLoader and NCCL
        assert pod["volumes"] == [
            {"name": "lorafleet-data", "persistentVolumeClaim": {"claimName": "lorafleet-data"}},
            SHM,
        ]
        assert pod["containers"] == [
            {
                "name": "node",
                "volumeMounts": [
                    {"name": "lorafleet-data", "mountPath": "/data"},
                    {"name": "lorafleet-shm", "mountPath": "/dev/shm"},
                ],
            }
        ]
        # and Kueue admits the whole job from its queue, at its priority
        assert KUEUE.items() <= live["metadata"]["labels"].items()
        assert (
            pod["nodeSelector"] == {"gpu": "h100"}
            and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        )

        seen: list[str] = []
        operator = iter(
            [
                {
                    "jobsStatus": [
                        {
                            "name": "node",
                            "active": 2,
                            "ready": 0,
                            "succeeded": 0,
                            "failed": 0,
                            "suspended": 0,
                        }
                    ]
                },
                {
                    "jobsStatus": [
                        {
                            "name": "node",
                            "active": 2,
                            "ready": 2,
                            "succeeded": 0,
                            "failed": 0,
                            "suspended": 0,
                        }
                    ]
                },
                {
                    "jobsStatus": [
                        {
                            "name": "node",
                            "active": 0,
                            "ready": 0,
                            "succeeded": 2,
                            "failed": 0,
                            "suspended": 0,
                        }
                    ],
                    "conditions": [
                        _condition("Complete", "JobsCompleted", "TrainJob is completed")
                    ],
                },
            ]
        )

        def report(line: str) -> None:  # the operator moves on after each line we report
            seen.append(line)
            status = next(operator, None)
            if status is not None:
                _set_status(api, TRAINJOB, "lf-job-analyzer", status)

        last = await asyncio.to_thread(
            wait_for_job, api, TRAINJOB, "ml-train", "lf-job-analyzer", 30, 0.01, report
        )
    assert seen == [
        "Pending",
        "Running (jobs node: active 2)",
        "Running (jobs node: active 2, ready 2)",
        "Succeeded (Complete: JobsCompleted: TrainJob is completed; jobs node: succeeded 2)",
    ]
    assert last == seen[-1]


async def test_a_failed_trainjob_ends_the_wait_with_the_operators_reason(kmock) -> None:
    with _api(kmock, TRAINJOB) as api:
        await asyncio.to_thread(submit_job, api, "lf-fails", JOB, TRAINING)
        await asyncio.to_thread(
            _set_status,
            api,
            TRAINJOB,
            "lf-fails",
            {
                "conditions": [
                    _condition(
                        "Failed", "JobsFailed", "node-0 exited 2: error: loss became nan at step 41"
                    )
                ]
            },
        )
        with pytest.raises(
            TrainingJobFailed,
            match=r"TrainJob/lf-fails in ml-train failed: Failed \(Failed: JobsFailed: node-0 exited 2: error: loss became nan",
        ):
            await asyncio.to_thread(
                wait_for_job, api, TRAINJOB, "ml-train", "lf-fails", 30, 0.01, lambda line: None
            )


async def test_a_pytorchjob_is_used_where_the_trainjob_api_is_absent(kmock) -> None:
    """Given a cluster with the Training Operator but not Kubeflow Trainer, then a PyTorchJob
    (one Master, nodes - 1 Workers) is created and followed Created -> Running -> Succeeded."""
    with _api(kmock, PYTORCHJOB) as api:
        kind, created = await asyncio.to_thread(submit_job, api, "lf-pt", JOB, TRAINING)
        assert kind is PYTORCHJOB and created["kind"] == "PyTorchJob"
        replicas = created["spec"]["pytorchReplicaSpecs"]
        assert (
            replicas["Master"]["replicas"],
            replicas["Worker"]["replicas"],
            created["spec"]["nprocPerNode"],
        ) == (1, 1, "4")
        container = replicas["Worker"]["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch" and container["resources"] == {
            "limits": {"nvidia.com/gpu": "4"}
        }
        assert SHM in replicas["Worker"]["template"]["spec"]["volumes"]
        assert {"name": "lorafleet-shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        assert KUEUE.items() <= created["metadata"]["labels"].items()

        seen: list[str] = []
        operator = iter(
            [
                {
                    "conditions": [
                        _condition("Created", "PyTorchJobCreated"),
                        _condition("Running", "PyTorchJobRunning"),
                    ]
                },
                {
                    "conditions": [
                        _condition("Created", "PyTorchJobCreated"),
                        _condition("Succeeded", "PyTorchJobSucceeded"),
                    ]
                },
            ]
        )

        def report(line: str) -> None:
            seen.append(line)
            status = next(operator, None)
            if status is not None:
                _set_status(api, PYTORCHJOB, "lf-pt", status)

        await asyncio.to_thread(
            _set_status,
            api,
            PYTORCHJOB,
            "lf-pt",
            {"conditions": [_condition("Created", "PyTorchJobCreated")]},
        )
        await asyncio.to_thread(
            wait_for_job, api, PYTORCHJOB, "ml-train", "lf-pt", 30, 0.01, report
        )
    assert seen == [
        "Pending (Created: PyTorchJobCreated)",
        "Running (Created: PyTorchJobCreated; Running: PyTorchJobRunning)",
        "Succeeded (Created: PyTorchJobCreated; Succeeded: PyTorchJobSucceeded)",
    ]


async def test_waiting_gives_up_after_the_timeout_and_a_duplicate_name_is_refused(kmock) -> None:
    with _api(kmock, TRAINJOB) as api:
        await asyncio.to_thread(submit_job, api, "lf-slow", JOB, TRAINING)
        with pytest.raises(
            TrainingJobFailed,
            match=r"TrainJob/lf-slow in ml-train: not finished after 0.05 s \(Pending\)",
        ):
            await asyncio.to_thread(
                wait_for_job, api, TRAINJOB, "ml-train", "lf-slow", 0.05, 0.01, lambda line: None
            )
        with pytest.raises(LorafleetError, match=r"TrainJob/lf-slow: the API server said 409"):
            await asyncio.to_thread(submit_job, api, "lf-slow", JOB, TRAINING)


async def test_lorafleet_train_submit_creates_and_follows_the_job(kmock, tmp_path: Path) -> None:
    """The CLI, run in process against kmock through a kubeconfig: it creates the expert's
    TrainJob, prints each status change and exits 0 once the job completes."""
    import yaml
    from typer.testing import CliRunner

    from lorafleet.cli import app

    for name in (
        "seed.jsonl",
        "eval.jsonl",
    ):  # the spec checks they exist; the cluster job never reads them
        (tmp_path / name).write_text("")
    spec = tmp_path / "fleet.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "lorafleet/v1",
                "name": "marketplace",
                "experts": [
                    {
                        "name": "job-analyzer",
                        "task": "job-analyzer",
                        "seed_data": "seed.jsonl",
                        "eval_data": "eval.jsonl",
                        "training": TRAINING.model_dump(mode="json", exclude_defaults=True),
                    }
                ],
            }
        )
    )
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "kmock",
                "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
                "users": [{"name": "kmock", "user": {"token": "test"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
            }
        )
    )
    with _api(kmock, TRAINJOB) as api:

        def finish() -> None:  # the operator completes the job soon after it appears
            for _ in range(500):
                if any(key[2] == "lf-cli" for key in kmock.objects):
                    _set_status(
                        api,
                        TRAINJOB,
                        "lf-cli",
                        {"conditions": [_condition("Complete", "JobsCompleted")]},
                    )
                    return
                time.sleep(0.01)

        args = [
            "train",
            "submit",
            str(spec),
            "--expert",
            "job-analyzer",
            "--base",
            "/data/base",
            "--train-set",
            "/data/train.jsonl",
            "--output",
            "/data/out",
            "--name",
            "lf-cli",
            "--poll",
            "0.02",
            "--kubeconfig",
            str(kubeconfig),
        ]
        operator = asyncio.create_task(asyncio.to_thread(finish))
        result = await asyncio.to_thread(CliRunner().invoke, app, args)
        await operator
    assert result.exit_code == 0, result.output
    assert "TrainJob/lf-cli created in ml-train" in result.output
    assert "TrainJob/lf-cli: Succeeded (Complete: JobsCompleted)" in result.output


def test_job_paths_must_be_on_the_shared_volume() -> None:
    with pytest.raises(
        LorafleetError,
        match=r"train_set: /home/me/train.jsonl is not under training.cluster.volume.mount_path /data",
    ):
        check_job_paths(
            JOB.model_copy(update={"train_set": "/home/me/train.jsonl"}), TRAINING.cluster
        )


async def test_the_pipeline_train_step_trains_through_a_trainjob(
    kmock, tiny_base: Path, tmp_path: Path, caplog
) -> None:
    """The train stage with ``launcher: trainjob``, as the KFP train step runs it.

    kmock stands in for the API server; the test plays the operator and the job's pod: it
    reads the created TrainJob, runs the pod's job (``python -m lorafleet.train.job --env``
    with the env var from the object, as one rank) against the shared volume (a temp dir
    mounted at the same path for "both pods"), then marks the job Complete. The step must
    stage its inputs on the volume, follow the job and bring the trained adapter back.
    """
    import os
    import subprocess
    import sys

    from lorafleet.fleet import load_fleet
    from lorafleet.stages import train_stage

    pvc = tmp_path / "pvc"
    pvc.mkdir()
    fleet = load_fleet(Path(__file__).resolve().parents[2] / "examples" / "fleet.yaml")
    training = TrainingSettings(
        launcher="trainjob",
        max_steps=3,
        batch_size=4,
        max_seq_len=256,
        cluster={
            "image": "registry.example/lorafleet:0.1.0",
            "namespace": "ml-train",
            "accelerator": None,
            "volume": {"claim": "lorafleet-data", "mount_path": str(pvc)},
        },
    )
    expert = fleet.expert("job-analyzer").model_copy(
        update={"training": training, "lora": LoraSettings(r=4, alpha=8)}
    )
    adapter_out = tmp_path / "step" / "adapter"

    async def operator(api) -> None:
        objects = CustomObjectsApi(api)
        while not (
            jobs := (
                await asyncio.to_thread(
                    objects.list_namespaced_custom_object,
                    TRAINJOB.group,
                    TRAINJOB.version,
                    "ml-train",
                    TRAINJOB.plural,
                )
            )["items"]
        ):
            await asyncio.sleep(0.1)
        job = jobs[0]
        name = job["metadata"]["name"]
        await asyncio.to_thread(
            _set_status, api, TRAINJOB, name, {"conditions": [_condition("Running", "JobsRunning")]}
        )
        env = {e["name"]: e["value"] for e in job["spec"]["trainer"]["env"]}
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "lorafleet.train.job", "--env", JOB_ENV],
            env={**os.environ, **env, "HF_HUB_OFFLINE": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        await asyncio.to_thread(
            _set_status,
            api,
            TRAINJOB,
            name,
            {"conditions": [_condition("Complete", "JobsCompleted")]},
        )

    caplog.set_level("INFO", logger="lorafleet.train.cluster")
    train_set = pvc.parent / "train.jsonl"
    train_set.write_bytes(Path(expert.seed_data).read_bytes())
    with _api(kmock, TRAINJOB, PYTORCHJOB) as api:
        result, _ = await asyncio.gather(
            asyncio.to_thread(
                train_stage, expert, str(tiny_base), train_set, adapter_out, kube_api=api
            ),
            operator(api),
        )

    assert result["steps"] == 3 and len(result["losses"]) == 3
    assert result["cluster_job"].startswith("TrainJob/lorafleet-job-analyzer-")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in adapter_out.iterdir()
    }
    # inputs were staged on the shared volume, and the job's status reached the step's log
    job_dir = pvc / "lorafleet-jobs" / result["cluster_job"].split("/", 1)[1]
    assert (job_dir / "base" / "config.json").is_file() and (job_dir / "train.jsonl").is_file()
    assert any("Running" in m for m in caplog.messages) and any(
        "Succeeded" in m for m in caplog.messages
    )


HUB_JOB = JOB.model_copy(update={"base_dir": "meta-llama/Llama-3.1-8B-Instruct"})
HUB_ENV = {"HF_HUB_OFFLINE": "0", "HF_HOME": "/data/huggingface"}
TOKEN = {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN", "optional": True}}


def test_a_hub_base_is_fetched_by_the_jobs_pods_with_the_token() -> None:
    # Given a job whose base is a hub id, not a folder on the volume
    check_job_paths(HUB_JOB, TRAINING.cluster)  # nothing to find on the volume
    # When it is built as a TrainJob and as a PyTorchJob, with the base's token Secret
    trainjob = build_trainjob("lf-hub", HUB_JOB, TRAINING, "hf-token")
    pytorchjob = build_pytorchjob("lf-hub", HUB_JOB, TRAINING, "hf-token")
    master = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    for env in (trainjob["spec"]["trainer"]["env"], master["containers"][0]["env"]):
        # Then every node may reach the hub, caches on the shared volume, and reads the
        # token from the Secret (never a copy of it in the job object)
        plain = {e["name"]: e["value"] for e in env if "value" in e}
        assert HUB_ENV.items() <= plain.items()
        assert json.loads(plain[JOB_ENV])["base_dir"] == "meta-llama/Llama-3.1-8B-Instruct"
        [token] = [e for e in env if "valueFrom" in e]
        assert token == {"name": "HF_TOKEN", "valueFrom": TOKEN}
    # A base on the volume needs neither
    plain = build_trainjob("lf-vol", JOB, TRAINING, "hf-token")["spec"]["trainer"]["env"]
    assert [e["name"] for e in plain] == [JOB_ENV]


def _hub_cache(home: Path, repo: str, model_dir: Path) -> str:
    """Lay ``model_dir`` out as huggingface_hub's cache under ``home`` (``HF_HOME``): the
    snapshot of a made-up commit, which ``refs/main`` names. Returns the commit."""
    import shutil

    commit = "c0ffee" * 6 + "c0ff"
    repo_dir = home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model_dir, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return commit


async def test_the_train_step_trains_a_hub_base_through_a_trainjob(
    kmock, tiny_base: Path, tmp_path: Path, monkeypatch
) -> None:
    """The train stage with a hub base: nothing of the base is staged on the volume; the job's
    pods download it into the volume's Hugging Face cache with the base's token.

    No hub is reachable here: the "download" is a cache already on the volume, laid out as
    huggingface_hub writes it (a local directory standing in for the hub), and the pod reads
    it with HF_HUB_OFFLINE=1 where on a cluster the job's HF_HUB_OFFLINE=0 would let it fetch.
    """
    import os
    import subprocess
    import sys

    from lorafleet.fleet import BaseSpec, load_fleet
    from lorafleet.stages import train_stage

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the step's fingerprint: no hub to ask here
    pvc = tmp_path / "pvc"
    pvc.mkdir()
    repo = "acme/tiny-llama"
    _hub_cache(pvc / "huggingface", repo, tiny_base)
    fleet = load_fleet(Path(__file__).resolve().parents[2] / "examples" / "fleet.yaml")
    training = _trainjob_training(pvc).model_copy(update={"batch_size": 4, "max_seq_len": 256})
    expert = fleet.expert("job-analyzer").model_copy(
        update={"training": training, "lora": LoraSettings(r=4, alpha=8)}
    )
    adapter_out = tmp_path / "step" / "adapter"
    train_set = tmp_path / "train.jsonl"
    train_set.write_bytes(Path(expert.seed_data).read_bytes())
    base = BaseSpec(model=repo, hub_token_secret="hf-token")

    async def operator(api) -> dict:
        job = await _first_trainjob(api)
        name = job["metadata"]["name"]
        env = job["spec"]["trainer"]["env"]
        plain = {e["name"]: e["value"] for e in env if "value" in e}
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "lorafleet.train.job", "--env", JOB_ENV],
            env={**os.environ, **plain, "HF_HUB_OFFLINE": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        await asyncio.to_thread(
            _set_status, api, TRAINJOB, name, {"conditions": [_condition("Complete", "Done")]}
        )
        return job

    with _api(kmock, TRAINJOB, PYTORCHJOB) as api:
        result, job = await asyncio.gather(
            asyncio.to_thread(
                train_stage, expert, repo, train_set, adapter_out, kube_api=api, base=base
            ),
            operator(api),
        )

    # Then the job trained the hub base from the volume's cache, with the token's Secret
    env = job["spec"]["trainer"]["env"]
    plain = {e["name"]: e["value"] for e in env if "value" in e}
    assert plain["HF_HOME"] == str(pvc / "huggingface") and plain["HF_HUB_OFFLINE"] == "0"
    assert json.loads(plain[JOB_ENV])["base_dir"] == repo
    assert {"name": "HF_TOKEN", "valueFrom": TOKEN} in env
    assert result["steps"] == 3 and (adapter_out / "adapter_model.safetensors").is_file()
    # and no copy of the base went onto the volume beside the training set
    job_dir = pvc / "lorafleet-jobs" / result["cluster_job"].split("/", 1)[1]
    assert (job_dir / "train.jsonl").is_file() and not (job_dir / "base").exists()


def _trainjob_training(pvc: Path) -> TrainingSettings:
    return TrainingSettings(
        launcher="trainjob",
        max_steps=3,
        cluster={
            "image": "registry.example/lorafleet:0.1.0",
            "namespace": "ml-train",
            "accelerator": None,
            "volume": {"claim": "lorafleet-data", "mount_path": str(pvc)},
        },
    )


async def _first_trainjob(api) -> dict:
    objects = CustomObjectsApi(api)
    while True:
        jobs = await asyncio.to_thread(
            objects.list_namespaced_custom_object,
            TRAINJOB.group,
            TRAINJOB.version,
            "ml-train",
            TRAINJOB.plural,
        )
        if jobs["items"]:
            return jobs["items"][0]
        await asyncio.sleep(0.05)


def _trainjobs(api) -> list[dict]:
    return CustomObjectsApi(api).list_namespaced_custom_object(
        TRAINJOB.group, TRAINJOB.version, "ml-train", TRAINJOB.plural
    )["items"]


async def test_a_failed_trainjob_is_deleted_so_its_gpus_are_freed(
    kmock, tiny_base: Path, tmp_path: Path
) -> None:
    """Given the step following its TrainJob, when the operator marks the job Failed, then the
    step fails with the reason and the TrainJob is gone (nothing keeps its nodes)."""
    pvc = tmp_path / "pvc"
    pvc.mkdir()
    train_set = tmp_path / "train.jsonl"
    train_set.write_text('{"prompt": "p", "completion": "c"}\n')
    training = _trainjob_training(pvc)
    job = JOB.model_copy(update={"training": training})

    async def operator(api) -> None:
        created = await _first_trainjob(api)
        assert created["spec"]["runtimePatches"][0]["manager"] == PATCH_MANAGER
        await asyncio.to_thread(
            _set_status,
            api,
            TRAINJOB,
            created["metadata"]["name"],
            {"conditions": [_condition("Failed", "JobsFailed", "node-0 OOMKilled")]},
        )

    with _api(kmock, TRAINJOB, PYTORCHJOB) as api:
        step = asyncio.to_thread(
            run_on_cluster,
            "job-analyzer",
            tiny_base,
            train_set,
            tmp_path / "adapter",
            job,
            training,
            api,
            0.05,
        )
        results = await asyncio.gather(step, operator(api), return_exceptions=True)
        assert isinstance(results[0], TrainingJobFailed) and "OOMKilled" in str(results[0])
        assert results[1] is None
        assert await asyncio.to_thread(_trainjobs, api) == []


async def test_a_cancelled_step_deletes_its_trainjob(
    kmock, tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given a running TrainJob, when the step is cancelled while it waits (KFP deletes the
    pod: SIGTERM, which :func:`sigterm_exits` turns into SystemExit), then the TrainJob is
    deleted before the step exits. The signal itself is tested below, in the main thread."""
    import lorafleet.train.cluster as cluster

    pvc = tmp_path / "pvc"
    pvc.mkdir()
    train_set = tmp_path / "train.jsonl"
    train_set.write_text('{"prompt": "p", "completion": "c"}\n')
    training = _trainjob_training(pvc)
    seen: list[list[dict]] = []

    def cancelled_wait(api, kind, namespace, name, *args, **kwargs):
        seen.append(_trainjobs(api))  # the job exists while the step waits
        raise SystemExit(143)

    monkeypatch.setattr(cluster, "wait_for_job", cancelled_wait)
    with _api(kmock, TRAINJOB, PYTORCHJOB) as api:
        with pytest.raises(SystemExit) as info:
            await asyncio.to_thread(
                run_on_cluster,
                "job-analyzer",
                tiny_base,
                train_set,
                tmp_path / "adapter",
                JOB.model_copy(update={"training": training}),
                training,
                api,
            )
        assert info.value.code == 143
        assert len(seen) == 1 and len(seen[0]) == 1
        assert await asyncio.to_thread(_trainjobs, api) == []


def test_sigterm_becomes_system_exit_while_waiting_and_is_restored_after() -> None:
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info, sigterm_exits():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert info.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
