"""The validate step reads data by URI (moto's S3 server on 127.0.0.1) and checks digests."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import boto3
import pytest

from lorafleet.errors import DataError, StorageError
from lorafleet.fleet import ExpertSpec
from lorafleet.records import read_records
from lorafleet.stages import validate_stage
from lorafleet.storage import Storage

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "job-analyzer"
BUCKET = "lorafleet-validate"


@pytest.fixture(scope="module")
def storage(s3_endpoint: str) -> Storage:
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    return Storage(s3_endpoint_url=s3_endpoint, pvc_mounts={})


@pytest.fixture(scope="module")
def staged(storage: Storage) -> dict[str, tuple[str, str]]:
    """The shipped job-analyzer files in the bucket: field -> (URI, sha256)."""
    prefix = f"s3://{BUCKET}/{uuid.uuid4().hex}"
    out = {}
    for field, name in (("seed_data", "seed.jsonl"), ("eval_data", "eval.jsonl")):
        uri = storage.copy_file(DATA / name, f"{prefix}/{name}").uri
        out[field] = (uri, hashlib.sha256((DATA / name).read_bytes()).hexdigest())
    return out


def _expert(staged: dict[str, tuple[str, str]], **change: str) -> ExpertSpec:
    fields = {"name": "job-analyzer", "task": "job-analyzer"}
    for field, (uri, digest) in staged.items():
        fields |= {field: uri, f"{field}_sha256": digest}
    return ExpertSpec(**{**fields, **change})


def test_validate_reads_uris_into_its_outputs(
    staged: dict[str, tuple[str, str]], storage: Storage, tmp_path: Path
) -> None:
    out = {name: tmp_path / name for name in ("seeds.jsonl", "eval.jsonl", "report.json", "r.html")}

    summary = validate_stage(
        _expert(staged),
        out["seeds.jsonl"],
        out["eval.jsonl"],
        out["report.json"],
        html_out=out["r.html"],
        storage=storage,
    )

    # The outputs hold the records (PII scrubbing leaves the shipped data as it is)
    assert [r for _, r in read_records(out["seeds.jsonl"])] == [
        r for _, r in read_records(DATA / "seed.jsonl")
    ]
    assert [r for _, r in read_records(out["eval.jsonl"])] == [
        r for _, r in read_records(DATA / "eval.jsonl")
    ]
    # and the reports name the files as the spec does, not where they were downloaded
    report = json.loads(out["report.json"].read_text())
    assert [f["file"] for f in report["files"]] == [staged["seed_data"][0], staged["eval_data"][0]]
    assert all(f["success"] for f in summary["files"])
    assert "seed.jsonl" in out["r.html"].read_text()


def test_validate_refuses_content_that_is_not_the_specs(
    staged: dict[str, tuple[str, str]], storage: Storage, tmp_path: Path
) -> None:
    uri, digest = staged["eval_data"]
    wrong = hashlib.sha256(b"another file").hexdigest()
    with pytest.raises(DataError) as err:
        validate_stage(
            _expert(staged, eval_data_sha256=wrong),
            tmp_path / "s.jsonl",
            tmp_path / "e.jsonl",
            tmp_path / "report.json",
            storage=storage,
        )
    assert str(err.value) == (
        f"{uri}: eval_data_sha256: expert job-analyzer: the file has sha256 {digest[:12]}…, "
        f"the spec says {wrong[:12]}…"
    )
    assert not (tmp_path / "s.jsonl").exists() and not (tmp_path / "report.json").exists()


def test_validate_checks_the_digest_of_a_local_file_too(tmp_path: Path) -> None:
    expert = ExpertSpec(
        name="job-analyzer",
        task="job-analyzer",
        seed_data=DATA / "seed.jsonl",
        eval_data=DATA / "eval.jsonl",
        seed_data_sha256="0" * 64,
    )
    with pytest.raises(DataError, match=r"seed\.jsonl: seed_data_sha256: expert job-analyzer: "):
        validate_stage(
            expert, tmp_path / "s.jsonl", tmp_path / "e.jsonl", tmp_path / "r.json", storage=None
        )


def test_a_missing_object_is_one_storage_line(
    staged: dict[str, tuple[str, str]], storage: Storage, tmp_path: Path
) -> None:
    missing = f"s3://{BUCKET}/nowhere/seed.jsonl"
    with pytest.raises(StorageError) as err:
        validate_stage(
            _expert(staged, seed_data=missing, seed_data_sha256=None),
            tmp_path / "s.jsonl",
            tmp_path / "e.jsonl",
            tmp_path / "r.json",
            storage=storage,
        )
    assert str(err.value).startswith(f"{missing}: ") and "\n" not in str(err.value)
