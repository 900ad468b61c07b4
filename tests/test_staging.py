"""Staging a spec's local data in an object store, and ``lorafleet spec stage``.

The store is moto's S3 server on 127.0.0.1 (the shared ``s3_endpoint`` fixture): uploads,
existence checks and reads go over HTTP through the storage layer, as they would to S3.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
import yaml

from lorafleet.errors import SpecError, StorageError
from lorafleet.fleet import load_fleet, spec_from_json
from lorafleet.staging import stage_spec
from lorafleet.storage import Storage

pytestmark = pytest.mark.integration

BUCKET = "lorafleet-staging"

SPEC = """\
apiVersion: lorafleet/v1
name: tiny
experts:
  - name: job-analyzer
    task: job-analyzer
    seed_data: data/seed.jsonl
    eval_data: data/eval.jsonl
  - name: proposal-writer
    task: proposal-writer
    seed_data: gs://elsewhere/pw/seed.jsonl   # already in a store: left as written
    eval_data: data/eval.jsonl                # the same file as above: one object
"""


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> str:
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    return BUCKET


@pytest.fixture
def store(bucket: str) -> str:
    """A fresh prefix per test: the server is shared."""
    return f"s3://{bucket}/{uuid.uuid4().hex}"


@pytest.fixture
def storage(s3_endpoint: str) -> Storage:
    return Storage(s3_endpoint_url=s3_endpoint, pvc_mounts={})


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "seed.jsonl").write_text('{"seed": 1}\n')
    (tmp_path / "data" / "eval.jsonl").write_text('{"eval": 1}\n')
    (tmp_path / "fleet.yaml").write_text(SPEC)
    return tmp_path / "fleet.yaml"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_staging_uploads_each_file_once_under_its_digest(
    spec_file: Path, store: str, storage: Storage
) -> None:
    spec = load_fleet(spec_file)
    seed, evals = spec_file.parent / "data" / "seed.jsonl", spec_file.parent / "data" / "eval.jsonl"

    done = stage_spec(spec, store, storage, source=spec_file)

    ja, pw = done.spec.experts
    seed_uri = f"{store}/data/sha256/{_sha(seed)}/seed.jsonl"
    eval_uri = f"{store}/data/sha256/{_sha(evals)}/eval.jsonl"
    assert (ja.seed_data, ja.seed_data_sha256) == (seed_uri, _sha(seed))
    assert (ja.eval_data, ja.eval_data_sha256) == (eval_uri, _sha(evals))
    assert (pw.eval_data, pw.eval_data_sha256) == (eval_uri, _sha(evals))
    assert (pw.seed_data, pw.seed_data_sha256) == ("gs://elsewhere/pw/seed.jsonl", None)
    assert sorted(loc.uri for loc in done.uploaded) == sorted([seed_uri, eval_uri])
    assert done.present == []
    assert storage.read_bytes(seed_uri) == seed.read_bytes()
    assert storage.read_bytes(eval_uri) == evals.read_bytes()
    # the spec that was staged is unchanged
    assert spec.experts[0].seed_data == str(seed)


def test_staging_again_uploads_nothing_and_new_content_gets_a_new_key(
    spec_file: Path, store: str, storage: Storage
) -> None:
    first = stage_spec(load_fleet(spec_file), store, storage)
    seed_uri = first.spec.experts[0].seed_data
    # Mark the stored object: an upload would overwrite the mark
    storage.write_bytes(seed_uri, b"marked")

    again = stage_spec(load_fleet(spec_file), store, storage)

    assert again.uploaded == []
    assert {loc.uri for loc in again.present} == {loc.uri for loc in first.uploaded}
    assert again.spec == first.spec
    assert storage.read_bytes(seed_uri) == b"marked"

    # When the file changes, it lands under its new digest beside the old object
    seed = spec_file.parent / "data" / "seed.jsonl"
    seed.write_text('{"seed": 2}\n')
    changed = stage_spec(load_fleet(spec_file), store, storage)
    assert [loc.uri for loc in changed.uploaded] == [f"{store}/data/sha256/{_sha(seed)}/seed.jsonl"]
    assert changed.spec.experts[0].seed_data_sha256 == _sha(seed)
    assert storage.exists(seed_uri)


def test_staging_refuses_a_file_that_is_not_the_one_the_spec_names(
    spec_file: Path, store: str, storage: Storage
) -> None:
    spec = load_fleet(spec_file)
    spec.experts[0].eval_data_sha256 = "0" * 64
    with pytest.raises(SpecError) as err:
        stage_spec(spec, store, storage, source=spec_file)
    evals = spec_file.parent / "data" / "eval.jsonl"
    assert str(err.value) == (
        f"{spec_file}: experts.0.eval_data_sha256: {evals} has sha256 {_sha(evals)[:12]}…, "
        "the spec says 000000000000…"
    )
    assert not storage.exists(store), "nothing is uploaded before every digest is known"


def test_staging_names_a_missing_file_and_refuses_a_local_target(
    spec_file: Path, store: str, storage: Storage, tmp_path: Path
) -> None:
    spec = load_fleet(spec_file)
    (spec_file.parent / "data" / "seed.jsonl").unlink()
    with pytest.raises(SpecError, match=r"fleet.yaml: experts.0.seed_data: file not found: /"):
        stage_spec(spec, store, storage, source=spec_file)
    with pytest.raises(StorageError, match="cannot read this machine's disk"):
        stage_spec(spec, tmp_path / "store", storage)


# --- the command ---------------------------------------------------------------------------


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", "spec", "stage", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def test_spec_stage_writes_the_staged_spec_to_stdout(
    spec_file: Path, store: str, storage: Storage, s3_endpoint: str, tmp_path: Path
) -> None:
    # The S3 endpoint comes from the standard variable: no profile names one here
    proc = _cli(
        str(spec_file), "--to", store, cwd=tmp_path, env={"AWS_ENDPOINT_URL_S3": s3_endpoint}
    )

    assert proc.returncode == 0, proc.stderr
    assert f"staged 2 data files in {store}: 2 uploaded, 0 already there" in proc.stderr
    # what it printed is a spec that reads back, from anywhere, as the staged spec
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "staged.yaml").write_text(proc.stdout)
    staged = load_fleet(elsewhere / "staged.yaml")
    expected = stage_spec(load_fleet(spec_file), store, storage)
    assert expected.uploaded == [], "the command uploaded them already"
    assert staged == expected.spec
    assert yaml.safe_load(proc.stdout)["experts"][0]["seed_data"].startswith(
        f"{store}/data/sha256/"
    )


def test_spec_stage_takes_store_and_endpoint_from_the_profile(
    spec_file: Path, bucket: str, s3_endpoint: str, tmp_path: Path
) -> None:
    store = f"s3://{bucket}/{uuid.uuid4().hex}"
    spec_file.write_text(
        SPEC + f"pipeline:\n  profiles:\n    onprem:\n"
        f"      storage: {{object_store: '{store}', endpoint: '{s3_endpoint}'}}\n"
    )

    proc = _cli(str(spec_file), "--profile", "onprem", "--json", "--out", "run.json", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    staged = spec_from_json((tmp_path / "run.json").read_text())
    ja = staged.experts[0]
    assert ja.seed_data.startswith(f"{store}/data/sha256/{ja.seed_data_sha256}/")
    storage = Storage(s3_endpoint_url=s3_endpoint, pvc_mounts={})
    assert storage.digest(ja.seed_data) == ja.seed_data_sha256


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "error: --to URI is needed (or --profile P, to use pipeline.profiles.P.storage"),
        (("--to", "/srv/data"), "error: /srv/data: data is staged to an object store"),
        (("--to", "s3:bucket"), "error: s3:bucket: malformed URI: write s3://..."),
        (("--profile", "aws"), "fleet.yaml: pipeline.profiles.aws: no such profile"),
    ],
)
def test_spec_stage_mistakes_are_one_line(
    spec_file: Path, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    proc = _cli(str(spec_file), *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr
    assert proc.stdout == ""


def test_spec_stage_names_the_missing_file_with_its_line(spec_file: Path, tmp_path: Path) -> None:
    (spec_file.parent / "data" / "eval.jsonl").unlink()
    proc = _cli(str(spec_file), "--to", "s3://bucket-never-reached/x", cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        proc.stderr
        == f"error: {spec_file}:7: experts.0.eval_data: file not found: data/eval.jsonl\n"
    )
