"""The registry on S3 (moto's server on 127.0.0.1): the behaviours of tests/test_registry.py
where writers share nothing but the bucket, and the stages and commands that read it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from lorafleet.deploy.render import resolve_adapters
from lorafleet.fleet import FleetSpec
from lorafleet.registry import ProductionChanged, Registry, RegistryError
from lorafleet.storage import RetryPolicy, Storage

from .conftest import S3_BUCKET

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)
LINEAGE = {"base": {"fingerprint": "abc"}}


@pytest.fixture
def storage(s3_endpoint: str) -> Storage:
    return Storage(s3_endpoint_url=s3_endpoint, pvc_mounts={}, retry=FAST_RETRY)


@pytest.fixture
def uri() -> str:
    """A fresh registry location in the bucket for each test."""
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex}/registry"


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"r": 4}')
    (d / "adapter_model.safetensors").write_bytes(b"weights")
    return d


def _card(version: str) -> str:
    return f"# card {version}\n"


def test_versions_lineage_and_download(
    storage: Storage, uri: str, adapter: Path, tmp_path: Path
) -> None:
    reg = Registry(uri, storage)
    reg.register("writer", adapter, LINEAGE, _card)
    second = reg.register("writer", adapter, LINEAGE, _card)

    assert second["uri"] == f"{uri}/writer/v2" == second["adapter_uri"]
    assert [v["version"] for v in Registry(uri, storage).versions("writer")] == ["v1", "v2"]
    lineage = reg.lineage("writer", "v2")
    assert lineage["files"] == {
        "adapter_config.json": hashlib.sha256(b'{"r": 4}').hexdigest(),
        "adapter_model.safetensors": hashlib.sha256(b"weights").hexdigest(),
    }
    got = reg.download("writer", "v2", tmp_path / "copy")
    assert (got / "README.md").read_text() == "# card v2\n"
    assert reg.local_dir("writer", "v1", tmp_path / "work") == tmp_path / "work/writer/v1"
    # A tampered object in the bucket is refused on download
    storage.write_bytes(f"{uri}/writer/v1/adapter_model.safetensors", b"tampered")
    with pytest.raises(RegistryError, match="does not match its recorded sha256"):
        reg.download("writer", "v1", tmp_path / "copy2")


def test_eight_concurrent_registers_lose_no_version(
    s3_endpoint: str, uri: str, adapter: Path, run_together
) -> None:
    def register(i: int) -> str:
        # Each writer its own storage client and registry, as each pod would have
        reg = Registry(uri, Storage(s3_endpoint_url=s3_endpoint, pvc_mounts={}))
        return reg.register("writer", adapter, {"i": i}, _card)["version"]

    got = run_together(8, register)
    expected = [f"v{n}" for n in range(1, 9)]
    assert sorted(got, key=lambda v: int(v[1:])) == expected
    reg = Registry(uri, Storage(s3_endpoint_url=s3_endpoint, pvc_mounts={}))
    assert [v["version"] for v in reg.versions("writer")] == expected
    assert sorted(reg.lineage("writer", v)["i"] for v in expected) == list(range(8))


def test_production_pointer_refuses_a_stale_move(
    storage: Storage, s3_endpoint: str, uri: str, adapter: Path, run_together
) -> None:
    reg = Registry(uri, storage)
    for _ in range(4):
        reg.register("writer", adapter, LINEAGE, _card)
    reg.set_production("writer", "v1")

    # Given an operator who saw v1 while another writer moved production to v2
    other = Registry(uri, Storage(s3_endpoint_url=s3_endpoint, pvc_mounts={}))
    seen = reg.pointer("writer")["version"]
    other.set_production("writer", "v2", expected="v1")
    # When the operator moves from what they saw, Then it is refused
    with pytest.raises(ProductionChanged, match="production of writer is v2, not v1"):
        reg.set_production("writer", "v3", expected=seen)
    assert reg.production("writer")["version"] == "v2"

    # Three writers move from v2 at once: exactly one wins
    def move(i: int) -> str:
        version = ("v1", "v3", "v4")[i]
        mine = Registry(uri, Storage(s3_endpoint_url=s3_endpoint, pvc_mounts={}))
        try:
            mine.set_production("writer", version, expected="v2")
            return version
        except ProductionChanged:
            return "refused"

    outcomes = run_together(3, move)
    winners = [o for o in outcomes if o != "refused"]
    assert len(outcomes) == 3 and len(winners) == 1
    assert reg.production("writer")["version"] == winners[0]


def test_half_registered_versions_are_never_listed_and_prune_removes_objects(
    storage: Storage, uri: str, adapter: Path
) -> None:
    reg = Registry(uri, storage)

    def dies(version: str) -> str:
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        reg.register("writer", adapter, LINEAGE, dies)
    storage.write_bytes(f"{uri}/writer/v2/adapter_model.safetensors", b"stray")
    assert reg.versions("writer") == [] and reg.record("writer", "v1")["state"] == "pending"
    for _ in range(3):
        reg.register("writer", adapter, LINEAGE, _card)
    assert [v["version"] for v in reg.versions("writer")] == ["v3", "v4", "v5"]

    reg.set_production("writer", "v3")
    assert reg.prune("writer", keep=1) == ["v4"]
    assert storage.list_prefix(f"{uri}/writer/v4") == []
    assert reg.record("writer", "v4")["state"] == "pruned"
    assert [v["version"] for v in reg.versions("writer")] == ["v3", "v5"]


def _spec(uri: str, adapter_store: str = "", handoff: str = "none") -> FleetSpec:
    return FleetSpec.model_validate(
        {
            "name": "f",
            "experts": [
                {
                    "name": "writer",
                    "task": "proposal-writer",
                    "seed_data": "s.jsonl",
                    "eval_data": "e.jsonl",
                }
            ],
            "registry": {"uri": uri},
            "serving": {"adapter_store": adapter_store},
            "canary": {"handoff": handoff},
        }
    )


def _report(production_version: str | None) -> dict:
    """The gate step's report, as far as the register step reads it."""
    return {
        "gate_passed": True,
        "gate_reasons": ["PASS all"],
        "gate_rules": [],
        "eval_loss_base": 2.0,
        "eval_loss_candidate": 1.0,
        "metrics_base": {"token_f1": 0.1},
        "metrics_candidate": {"token_f1": 0.5},
        "curation": {
            "train_sha256": "t",
            "eval_sha256": "e",
            "output": {"total": 10, "human": 5, "synthetic": 5},
        },
        "production_version": production_version,
    }


def test_register_and_evaluate_stages_use_a_registry_in_a_bucket(
    s3_endpoint: str,
    uri: str,
    tiny_base: Path,
    adapter: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from lorafleet.stages import production_adapter, register_stage

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    store = uri.replace("/registry", "/adapters")
    # The first version (no canary: handoff none) becomes production and lands in the store
    spec = _spec(uri, store)
    first = register_stage(spec, spec.expert("writer"), str(tiny_base), adapter, _report(None))
    assert (first["adapter_uri"], first["became_production"]) == (f"{store}/writer/v1", True)
    assert "adapter_path" not in first
    storage = Storage(pvc_mounts={})
    assert json.loads(storage.read_text(f"{store}/writer/v1/lineage.json"))["files"]
    # With a canary to judge it, the next version waits for the rollout's promotion
    drive = _spec(uri, store, handoff="drive")
    second = register_stage(drive, drive.expert("writer"), str(tiny_base), adapter, _report("v1"))
    assert (second["adapter_version"], second["became_production"]) == ("v2", False)
    assert Registry(uri).production("writer")["version"] == "v1"

    # The evaluate step compares against production, downloaded from the bucket
    production = production_adapter(spec, spec.expert("writer"), str(tiny_base), tmp_path)
    assert production is not None and production["version"] == "v1"
    local = Path(production["path"])
    assert local.is_relative_to(tmp_path)
    assert (local / "adapter_model.safetensors").read_bytes() == (
        adapter / "adapter_model.safetensors"
    ).read_bytes()
    # ... unless production was trained on another base: skipped, with the warning
    with caplog.at_level(logging.WARNING, logger="lorafleet.stages"):
        other_base = "some-org/another-base"
        assert production_adapter(spec, spec.expert("writer"), other_base, tmp_path) is None
    assert "production v1 was trained on another base; not compared" in caplog.text


def test_deploy_render_and_the_registry_cli_read_a_bucket(
    s3_endpoint: str, storage: Storage, uri: str, adapter: Path, tmp_path: Path
) -> None:
    reg = Registry(uri, storage)
    for expert in ("proposal-writer", "proposal-writer", "job-analyzer"):
        reg.register(expert, adapter, LINEAGE, _card)
    reg.set_production("proposal-writer", "v1")
    spec = FleetSpec.model_validate(
        {
            **json.loads(_spec(uri).model_dump_json(by_alias=True)),
            "experts": [
                {"name": n, "task": n, "seed_data": "s.jsonl", "eval_data": "e.jsonl"}
                for n in ("proposal-writer", "job-analyzer")
            ],
        }
    )
    assert resolve_adapters(spec, storage=storage) == {
        "proposal-writer": "v1",
        "job-analyzer": "v1",
    }

    env = {"AWS_ENDPOINT_URL_S3": s3_endpoint}
    shutil.copy(ROOT / "tests/deploy/fleet.yaml", tmp_path / "fleet.yaml")
    render = _run(
        "deploy",
        "render",
        "fleet.yaml",
        "--profile",
        "aws",
        "--registry",
        uri,
        cwd=tmp_path,
        env=env,
    )
    assert render.returncode == 0, render.stderr
    assert "proposal-writer=/mnt/models/adapters/proposal-writer/v1" in render.stdout
    listed = _run("registry", "list", "--registry", uri, "--json", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    experts = json.loads(listed.stdout)["experts"]
    assert sorted(experts) == ["job-analyzer", "proposal-writer"]
    assert experts["proposal-writer"]["production"] == "v1"
    promoted = _run(
        "registry", "promote", "proposal-writer", "v2", "--registry", uri, cwd=tmp_path, env=env
    )
    assert promoted.returncode == 0, promoted.stderr
    assert reg.production("proposal-writer")["version"] == "v2"


def _run(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
