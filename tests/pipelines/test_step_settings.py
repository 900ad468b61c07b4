"""Step operations settings in the compiled pipeline: CPU and memory, retries, timeouts, image
pull policy and secrets, and the component image (``--image``).

Checked on the committed profile goldens (``examples/fleet-cluster.yaml`` compiled) against
what the spec and :data:`~lorafleet.pipelines.platform.STEP_DEFAULTS` say each step gets.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorafleet.errors import LorafleetError, SpecError
from lorafleet.fleet import PIPELINE_STEPS, PlatformProfile, load_fleet
from lorafleet.fleet.platform import NEVER_RETRIED_STEPS
from lorafleet.pipelines.compile import compile_fleet, profile_golden
from lorafleet.pipelines.platform import DEFAULT_RETRIES, STEP_DEFAULTS, spec_profile

CLUSTER_SPEC = Path(__file__).resolve().parents[2] / "examples" / "fleet-cluster.yaml"
PROFILES = ("aws", "gcp", "onprem")
DIGEST = "ghcr.io/lorafleet/lorafleet:0.1.0@sha256:" + "0123456789abcdef" * 4


def _tasks(dag: dict, components: dict) -> dict[str, dict]:
    """Every container task of the pipeline, by task name, through its sub-DAGs."""
    found = {}
    for name, task in dag["tasks"].items():
        component = components[task["componentRef"]["name"]]
        if "dag" in component:
            found.update(_tasks(component["dag"], components))
        else:
            found[name] = {**task, "executor": component["executorLabel"]}
    return found


def _compiled(path: Path) -> tuple[dict[str, dict], dict, dict]:
    """Tasks by name, executors, and platforms.kubernetes executors of one compiled IR."""
    docs = list(yaml.safe_load_all(path.read_text()))
    tasks = _tasks(docs[0]["root"]["dag"], docs[0]["components"])
    kube = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if docs[1:] else {}
    return tasks, docs[0]["deploymentSpec"]["executors"], kube


def _want(profile: PlatformProfile, step: str, field: str):
    """The value ``field`` must have on ``step``: its own, else all_steps', else the default."""
    for settings in (profile.steps.get(step), profile.all_steps, STEP_DEFAULTS[step]):
        if settings is not None and getattr(settings, field) not in (None, []):
            return getattr(settings, field)
    return None


@pytest.mark.parametrize("profile", PROFILES)
def test_every_step_has_resources_a_timeout_and_retries_where_safe(profile: str) -> None:
    settings = load_fleet(CLUSTER_SPEC, check_files=False).pipeline.profiles[profile]
    tasks, executors, kube = _compiled(profile_golden(profile))
    assert set(tasks) == set(PIPELINE_STEPS)
    for step, task in tasks.items():
        resources = executors[task["executor"]]["container"].get("resources")
        assert resources, f"{step}: no resources"
        for field, key in (
            ("cpu_request", "resourceCpuRequest"),
            ("cpu_limit", "resourceCpuLimit"),
            ("memory_request", "resourceMemoryRequest"),
            ("memory_limit", "resourceMemoryLimit"),
        ):
            assert resources[key] == _want(settings, step, field), (step, field)
        timeout = kube[task["executor"]]["activeDeadlineSeconds"]
        assert int(timeout) == _want(settings, step, "timeout_seconds"), step
        retry = task.get("retryPolicy")
        if step in NEVER_RETRIED_STEPS:
            assert retry is None, f"{step} acts outside KFP or reports a verdict: no retry"
        else:
            assert retry is not None and retry["maxRetryCount"] == DEFAULT_RETRIES, step


def test_training_and_evaluation_get_more_than_the_light_steps() -> None:
    tasks, executors, _ = _compiled(profile_golden("gcp"))

    def memory(step: str) -> float:
        return executors[tasks[step]["executor"]]["container"]["resources"]["memoryRequest"]

    assert memory("train") > memory("curate") > memory("gate")
    assert memory("evaluate") == memory("train")


def test_onprem_pulls_from_its_registry_with_its_secret() -> None:
    tasks, _, kube = _compiled(profile_golden("onprem"))
    for step, task in tasks.items():
        config = kube[task["executor"]]
        assert config["imagePullPolicy"] == "IfNotPresent", step
        assert [s["secretName"] for s in config["imagePullSecret"]] == ["registry-pull"], step
    _, _, aws = _compiled(profile_golden("aws"))
    assert not any("imagePullPolicy" in c or "imagePullSecret" in c for c in aws.values())


def test_all_steps_retries_never_reach_the_steps_with_effects(tmp_path: Path) -> None:
    profile = PlatformProfile.model_validate({"all_steps": {"retries": 5}})
    tasks, _, _ = _compiled(compile_fleet(tmp_path / "p.yaml", profile))
    assert tasks["train"]["retryPolicy"]["maxRetryCount"] == 5
    assert all("retryPolicy" not in tasks[s] for s in NEVER_RETRIED_STEPS)


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ("        train:\n", "        register: {retries: 1}\n        train:\n", "never retried"),
        (
            "        train:\n",
            "        fleet-status: {retries: 1}\n        train:\n",
            "never retried",
        ),
        ("          memory_limit: 28Gi\n", "          shm_size: lots\n", "shm_size"),
        (
            "          memory_limit: 28Gi\n",
            "          priority_class: high\n",
            "priority_class: Kueue",
        ),
        ("          memory_limit: 28Gi\n", "          memory_limit: 28 GB\n", "memory_limit"),
        ("          memory_limit: 28Gi\n", "          timeout_seconds: 0\n", "timeout_seconds"),
    ],
)
def test_bad_step_settings_are_refused_with_their_field(
    old: str, new: str, where: str, tmp_path: Path
) -> None:
    text = CLUSTER_SPEC.read_text()
    assert old in text
    (tmp_path / "fleet.yaml").write_text(text.replace(old, new, 1))
    with pytest.raises(SpecError, match=r"pipeline\.profiles\.aws.*" + where):
        load_fleet(tmp_path / "fleet.yaml", check_files=False)


def test_image_given_by_digest_runs_every_step(tmp_path: Path) -> None:
    for platform in (None, spec_profile(CLUSTER_SPEC, "aws")):
        _, executors, _ = _compiled(compile_fleet(tmp_path / "p.yaml", platform, image=DIGEST))
        assert {e["container"]["image"] for e in executors.values()} == {DIGEST}


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("ghcr.io/lorafleet/lorafleet", "name a tag or, better, a digest"),
        ("ghcr.io/lorafleet/lorafleet@sha256:abc", "not an image reference"),
        ("Ghcr.io/Lorafleet:1", "not an image reference"),
    ],
)
def test_bad_image_is_one_line(image: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(LorafleetError, match=message):
        compile_fleet(tmp_path / "p.yaml", image=image)
    assert not (tmp_path / "p.yaml").exists()


def test_compile_cli_takes_the_image(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", "compile", "--image", DIGEST, "--out", "p.yaml"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    _, executors, _ = _compiled(tmp_path / "p.yaml")
    assert {e["container"]["image"] for e in executors.values()} == {DIGEST}


# --- /dev/shm, Kueue queue and priority -------------------------------------------------------


def _shm(kube: dict, executor: str) -> list[dict]:
    return kube.get(executor, {}).get("emptyDirMounts", [])


@pytest.mark.parametrize("profile", PROFILES)
def test_training_gets_a_memory_backed_dev_shm(profile: str) -> None:
    tasks, _, kube = _compiled(profile_golden(profile))
    assert _shm(kube, tasks["train"]["executor"]) == [
        {
            "medium": "Memory",
            "mountPath": "/dev/shm",
            "sizeLimit": "8Gi",
            "volumeName": "lorafleet-shm",
        }
    ]
    assert not any(_shm(kube, t["executor"]) for s, t in tasks.items() if s != "train")


def test_queue_priority_and_shm_from_the_profile(tmp_path: Path) -> None:
    # Given GPU steps queued in Kueue, training at a high priority with a bigger /dev/shm
    profile = PlatformProfile.model_validate(
        {
            "all_steps": {"queue_name": "team-ml"},
            "steps": {
                "train": {"priority_class": "gpu-high", "shm_size": "16Gi"},
                "evaluate": {"queue_name": "gpu-eval", "shm_size": "2Gi"},
            },
        }
    )
    tasks, _, kube = _compiled(compile_fleet(tmp_path / "p.yaml", profile))
    labels = {
        s: kube[t["executor"]].get("podMetadata", {}).get("labels", {}) for s, t in tasks.items()
    }
    # Then every pod waits in its queue, the step's own winning over all_steps
    assert labels["train"] == {
        "kueue.x-k8s.io/queue-name": "team-ml",
        "kueue.x-k8s.io/priority-class": "gpu-high",
    }
    assert labels["evaluate"] == {"kueue.x-k8s.io/queue-name": "gpu-eval"}
    assert labels["gate"] == {"kueue.x-k8s.io/queue-name": "team-ml"}
    # and a pod has one /dev/shm, sized by the last settings that size it
    assert [m["sizeLimit"] for m in _shm(kube, tasks["train"]["executor"])] == ["16Gi"]
    assert [m["sizeLimit"] for m in _shm(kube, tasks["evaluate"]["executor"])] == ["2Gi"]


def test_a_priority_without_a_queue_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"all_steps\.priority_class: Kueue reads it only on a queued pod"
    ):
        PlatformProfile.model_validate({"all_steps": {"priority_class": "high"}})
    # a queue in the step's own settings is enough for that step
    PlatformProfile.model_validate(
        {"steps": {"train": {"priority_class": "high", "queue_name": "gpu"}}}
    )
