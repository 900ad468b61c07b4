"""``examples/fleet-70b.yaml`` as shipped: a 70B base trained with FSDP over 2 x 8 GPUs and
served by vLLM with tensor parallelism over 4.

The pipeline compiles for every cluster profile, each step told its profile; ``deploy
render`` renders it on every profile from a local registry folder (the spec's registry is
S3 on MinIO): PVCs on onprem and local, the cloud's buckets and workload identity on aws and
gcp (``serving.profiles``); the TrainJob built from an expert's settings carries 2 nodes of
8 GPUs and the FSDP setting its ranks read.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorafleet.fleet import load_fleet
from lorafleet.registry import Registry
from lorafleet.train.cluster import JOB_ENV, build_trainjob
from lorafleet.train.job import TrainJobConfig

pytestmark = pytest.mark.integration

SPEC = Path(__file__).resolve().parents[2] / "examples" / "fleet-70b.yaml"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local registry folder with v1 of every expert (a stand-in adapter: render reads
    only the index)."""
    root = tmp_path_factory.mktemp("registry-70b")
    spec = load_fleet(SPEC, check_files=False)
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"\0")
    registry = Registry(str(root / "registry"))
    for expert in spec.experts:
        registry.register(expert.name, adapter, {"base": {"model": spec.base.model}}, str)
    return root / "registry"


@pytest.mark.parametrize("profile", ["onprem", "aws", "gcp"])
def test_the_70b_pipeline_compiles_for_every_profile(profile: str, tmp_path: Path) -> None:
    out = tmp_path / f"fleet_pipeline-{profile}.yaml"
    done = _cli(
        "compile", "--spec", str(SPEC), "--profile", profile, "--out", str(out), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    pipeline = next(yaml.safe_load_all(out.read_text()))
    assert "comp-train" in pipeline["components"]
    executors = pipeline["deploymentSpec"]["executors"]
    for executor in executors.values():  # each step reads serving as its profile sees it
        env = {e["name"]: e["value"] for e in executor["container"].get("env", [])}
        assert env["LORAFLEET_PROFILE"] == profile
    # evaluation runs the base as serving does, vLLM over 4 GPUs: the step holds them
    evaluate = executors["exec-evaluate"]["container"]
    assert evaluate["resources"]["accelerator"]["resourceCount"] == "4"


def test_a_profile_that_starves_vllm_evaluation_of_gpus_does_not_compile(tmp_path: Path) -> None:
    raw = yaml.safe_load(SPEC.read_text())
    del raw["pipeline"]["profiles"]["aws"]["steps"]
    spec = tmp_path / "fleet-70b.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = tmp_path / "p.yaml"
    done = _cli("compile", "--spec", str(spec), "--profile", "aws", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.strip() == (
        f"error: {spec}: pipeline.profiles.aws.steps.evaluate.accelerator_count: 0: "
        "proposal-writer, job-analyzer, profile-reviewer evaluate through vLLM over "
        "serving.gpus (4, --tensor-parallel-size): give the evaluate step that many GPUs "
        "(and a shm_size for its workers)"
    )


@pytest.mark.parametrize("profile", ["onprem", "local", "aws", "gcp"])
def test_the_70b_fleet_renders_vllm_over_four_gpus_on_every_profile(
    profile: str, registry: Path, tmp_path: Path
) -> None:
    done = _cli(
        *("deploy", "render", str(SPEC), "--profile", profile, "--registry", str(registry)),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    objects = [o for o in yaml.safe_load_all(done.stdout) if o]
    [isvc] = [o for o in objects if o["kind"] == "InferenceService"]
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    args = model["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "4"
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "4"
    [runtime] = [o for o in objects if o["kind"] == "ServingRuntime"]
    mounts = runtime["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in mounts
    # base and adapters come from where this profile's pods can read them (serving.profiles)
    schemes = {u["uri"].split("://")[0] for u in predictor["storageUris"]}
    assert schemes == {"onprem": {"pvc"}, "local": {"pvc"}, "aws": {"s3"}, "gcp": {"gs"}}[profile]
    identity = {
        "aws": "eks.amazonaws.com/role-arn",
        "gcp": "iam.gke.io/gcp-service-account",
    }.get(profile)
    if identity:
        annotations = [o["metadata"].get("annotations") or {} for o in objects]
        assert any(identity in a for a in annotations)


def test_the_70b_spec_validates_on_every_profile_it_names(tmp_path: Path) -> None:
    done = _cli("spec", "check", str(SPEC), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr


def test_each_expert_trains_as_one_fsdp_job_over_two_nodes_of_eight_gpus() -> None:
    spec = load_fleet(SPEC, check_files=False)
    expert = spec.experts[0]
    training = expert.training
    assert (training.sharding, training.world_size) == ("fsdp", 16)
    mount = training.cluster.volume.mount_path
    job = TrainJobConfig(
        base_dir=f"{mount}/base",
        train_set=f"{mount}/{expert.name}/train.jsonl",
        output_dir=f"{mount}/{expert.name}/adapter",
        lora=expert.lora,
        training=training,
    )
    trainjob = build_trainjob("lf-70b", job, training, spec.base.hub_token_secret)
    trainer = trainjob["spec"]["trainer"]
    assert trainer["numNodes"] == 2
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "8"}
    [job_env] = [e for e in trainer["env"] if e["name"] == JOB_ENV]
    ranks_read = json.loads(job_env["value"])["training"]
    assert (ranks_read["sharding"], ranks_read["gradient_checkpointing"]) == ("fsdp", True)
