"""``lorafleet deploy render`` through the real CLI entry point."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from ..cli_support import run_lorafleet as _lorafleet


def test_render_writes_validated_files_from_the_registry(tmp_path, kit):
    # Given the test fleet next to a registry holding one adapter version per expert
    shutil.copy(kit.ROOT / "tests/deploy/fleet.yaml", tmp_path / "fleet.yaml")
    from lorafleet.registry import Registry

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"\0")
    for expert in kit.ADAPTERS:
        Registry(tmp_path / "registry").register(expert, adapter, {}, lambda v: v)
    cli = [sys.executable, "-m", "lorafleet.cli", "deploy", "render", str(tmp_path / "fleet.yaml")]
    # When rendered for gcp with the aws spec's s3 store, Then one clear line and exit 2
    bad = subprocess.run([*cli, "--profile", "gcp"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert (
        bad.stderr.strip().startswith("error: serving.adapter_store:")
        and "Traceback" not in bad.stderr
    )
    # When rendered for aws into a folder, Then one file per object, adapters at v1
    done = subprocess.run(
        [*cli, "--profile", "aws", "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "inferenceservice-marketplace-prod.yaml" in files and len(files) == 9
    isvc = yaml.safe_load((tmp_path / "out/inferenceservice-marketplace-prod.yaml").read_text())
    assert (
        "proposal-writer=/mnt/models/adapters/proposal-writer/v1"
        in isvc["spec"]["predictor"]["model"]["args"]
    )


def _registry(root: Path, experts: list[str], base: Path) -> None:
    """A registry holding v1 of each expert, whose lineage names ``base``."""
    from lorafleet.registry import Registry

    adapter = root / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"\0")
    for expert in experts:
        Registry(root / "registry").register(
            expert, adapter, {"base": {"model": str(base)}}, lambda v: v
        )


def test_the_demo_spec_renders_for_a_local_cluster(tmp_path, kit):
    # Given the demo spec (profile local, base.model demo) and a registry next to it whose
    # versions were trained on a base built in a run folder
    spec = yaml.safe_load((kit.ROOT / "examples/fleet.yaml").read_text())
    spec["registry"] = {"uri": "registry"}
    for e in spec["experts"]:
        e["seed_data"] = e["eval_data"] = "seed.jsonl"
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(spec))
    base = tmp_path / "runs/r1/build-base/base"
    base.mkdir(parents=True)
    _registry(tmp_path, [e["name"] for e in spec["experts"]], base)
    # When it is rendered with no --profile
    done = _lorafleet("deploy", "render", "fleet.yaml", cwd=tmp_path)
    # Then the InferenceService mounts the built base and the registry from the node
    assert done.returncode == 0, done.stderr
    objects = list(yaml.safe_load_all(done.stdout))
    isvc = next(o for o in objects if o["kind"] == "InferenceService")
    predictor = isvc["spec"]["predictor"]
    assert "storageUris" not in predictor
    volumes = {v["name"]: v["hostPath"]["path"] for v in predictor["volumes"]}
    assert volumes == {"base": str(base), "adapters": str(tmp_path / "registry")}
    mounts = {m["name"]: m["mountPath"] for m in predictor["model"]["volumeMounts"]}
    assert mounts == {"base": "/mnt/models/base", "adapters": "/mnt/models/adapters"}
    assert "job-analyzer=/mnt/models/adapters/job-analyzer/v1" in predictor["model"]["args"]
    # And the serving ServiceAccount carries no cloud identity
    sa = next(o for o in objects if o["metadata"]["name"] == "lorafleet-serving")
    assert not sa["metadata"].get("annotations")


def test_the_cluster_spec_fails_on_one_named_field_before_reading_its_registry(tmp_path, kit):
    # Given the shipped cluster spec without its IRSA role (its registry is in S3, unreachable)
    spec = yaml.safe_load((kit.ROOT / "examples/fleet-cluster.yaml").read_text())
    assert spec["serving"]["storage"]["role_arn"]
    del spec["serving"]["storage"]
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "data").symlink_to(kit.ROOT / "examples/data")
    # When it is rendered, Then one line names the one missing field, and spec check agrees
    done = _lorafleet("deploy", "render", "fleet.yaml", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: serving.storage.role_arn: required for profile aws (IRSA role of the serving pods)"
    ]
    check = _lorafleet("spec", "check", "fleet.yaml", cwd=tmp_path)
    assert check.returncode == 2 and check.stdout == ""
    assert (
        check.stderr.startswith("error: fleet.yaml:") and "serving.storage.role_arn" in check.stderr
    )


def test_the_shipped_cluster_spec_renders_from_a_local_copy_of_its_registry(tmp_path, kit):
    experts = [
        e["name"]
        for e in yaml.safe_load((kit.ROOT / "examples/fleet-cluster.yaml").read_text())["experts"]
    ]
    _registry(tmp_path, experts, tmp_path)
    spec = str(kit.ROOT / "examples/fleet-cluster.yaml")
    # When the registry given is a file of it, Then one line says what to pass instead
    (tmp_path / "index.json").write_text("{}")
    bad = _lorafleet("deploy", "render", spec, "--registry", "index.json", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: --registry index.json: a file; pass the registry's folder")
    # When the registry folder is given, Then it renders (adapters in S3, read with IRSA)
    done = _lorafleet("deploy", "render", spec, "--registry", "registry", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    isvc = next(o for o in yaml.safe_load_all(done.stdout) if o["kind"] == "InferenceService")
    uris = [u["uri"] for u in isvc["spec"]["predictor"]["storageUris"]]
    assert uris[1] == "s3://marketplace-ml/lorafleet/adapters"


def test_vllm_on_cpus_is_a_one_line_warning_not_an_error(tmp_path, kit):
    # Given the shipped cluster spec (runtime vllm, canary mode router) on CPU nodes
    spec = yaml.safe_load((kit.ROOT / "examples/fleet-cluster.yaml").read_text())
    assert spec["serving"]["runtime"] == "vllm" and spec["canary"]["mode"] == "router"
    spec["serving"]["gpus"] = 0
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (tmp_path / "data").symlink_to(kit.ROOT / "examples/data")
    gpus_line = next(
        i + 1
        for i, line in enumerate((tmp_path / "fleet.yaml").read_text().splitlines())
        if line.strip() == "gpus: 0"
    )
    # When it is checked, Then it passes with one warning line naming the field and its line
    check = _lorafleet("spec", "check", "fleet.yaml", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    [warning] = check.stderr.splitlines()
    assert warning.startswith(f"warning: fleet.yaml:{gpus_line}: serving.gpus: 0 with runtime vllm")
    assert "vLLM's CPU build" in warning
    as_json = _lorafleet("spec", "check", "fleet.yaml", "--json", cwd=tmp_path)
    result = json.loads(as_json.stdout)
    assert result["ok"] is True
    assert [(w["field"], w["line"]) for w in result["warnings"]] == [("serving.gpus", gpus_line)]
    # When it is rendered, Then the same warning, and the CPU build is what serves
    experts = [e["name"] for e in spec["experts"]]
    _registry(tmp_path, experts, tmp_path)
    done = _lorafleet("deploy", "render", "fleet.yaml", "--registry", "registry", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [ln for ln in done.stderr.splitlines() if ln.startswith("warning:")] == [
        "warning: " + warning.split(": ", 2)[2]
    ]
    runtime = next(o for o in yaml.safe_load_all(done.stdout) if o["kind"] == "ServingRuntime")
    assert runtime["spec"]["containers"][0]["image"].endswith("-cpu")
    # and a GPU fleet says nothing
    ok = _lorafleet("spec", "check", str(kit.ROOT / "examples/fleet-cluster.yaml"), cwd=tmp_path)
    assert ok.returncode == 0 and "warning" not in ok.stderr
