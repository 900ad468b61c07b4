"""``lorafleet deploy render`` through the real CLI entry point."""

from __future__ import annotations

import shutil
import subprocess
import sys

import yaml


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
