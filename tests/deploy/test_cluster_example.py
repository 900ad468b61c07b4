"""``examples/fleet-cluster.yaml`` as shipped, through ``lorafleet deploy render`` per profile.

The spec's registry (``s3://marketplace-ml/lorafleet/registry``) is on moto's S3 server,
holding one version of every expert: aws and local render from it as the spec says; gcp and
onprem stop before reading it, with one line naming the one field their user must change.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml

from lorafleet.fleet import load_fleet
from lorafleet.registry import Registry
from lorafleet.storage import Storage

pytestmark = pytest.mark.integration

CLUSTER_SPEC = Path(__file__).resolve().parents[2] / "examples" / "fleet-cluster.yaml"


@pytest.fixture
def shipped_registry(s3_endpoint: str, tmp_path: Path) -> str:
    """The spec's S3 registry on the moto server, with v1 of every expert."""
    spec = load_fleet(CLUSTER_SPEC, check_files=False)
    bucket = spec.registry.uri.removeprefix("s3://").split("/", 1)[0]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    if bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=bucket)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"\0")
    registry = Registry(spec.registry.uri, Storage(s3_endpoint_url=s3_endpoint))
    for expert in spec.experts:
        registry.register(expert.name, adapter, {"base": {"model": spec.base.model}}, str)
    return s3_endpoint


def _render(profile: str, s3_endpoint: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            *(sys.executable, "-m", "lorafleet.cli", "deploy", "render", str(CLUSTER_SPEC)),
            *("--profile", profile),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
        env={**os.environ, "AWS_ENDPOINT_URL_S3": s3_endpoint},
    )


@pytest.mark.parametrize("profile", ["aws", "local"])
def test_the_shipped_cluster_spec_renders(
    profile: str, shipped_registry: str, tmp_path: Path
) -> None:
    done = _render(profile, shipped_registry, tmp_path)
    assert done.returncode == 0, done.stderr
    kinds = [o["kind"] for o in yaml.safe_load_all(done.stdout) if o]
    assert "InferenceService" in kinds and "ServingRuntime" in kinds


@pytest.mark.parametrize(
    ("profile", "line"),
    [
        (
            "gcp",
            "error: serving.adapter_store: 's3://marketplace-ml/lorafleet/adapters' cannot be "
            "read on profile gcp (schemes: gs://, hf://)",
        ),
        (
            "onprem",
            "error: serving.storage: profile onprem needs pvc, or s3_endpoint and "
            "credentials_secret (MinIO)",
        ),
    ],
)
def test_the_shipped_cluster_spec_names_the_one_field_to_change(
    profile: str, line: str, shipped_registry: str, tmp_path: Path
) -> None:
    done = _render(profile, shipped_registry, tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [line]
