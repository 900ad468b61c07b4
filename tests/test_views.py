"""Each pipeline step reads its view of the fleet, so KFP's cache reruns only what an edit
touches; the run's first step applies the run parameters and keys data on its content."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import boto3
import pytest

from lorafleet.errors import SpecError
from lorafleet.fleet import load_fleet, spec_to_json
from lorafleet.fleet.views import VIEWS, step_view
from lorafleet.stages import resolve_stage
from lorafleet.storage import Storage

from .conftest import S3_BUCKET

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    shutil.copytree(EXAMPLES / "data", tmp_path / "data")
    spec = tmp_path / "fleet.yaml"
    spec.write_text((EXAMPLES / "fleet.yaml").read_text())
    return spec


def _views(spec_path: Path, expert: str = "job-analyzer") -> dict[str, str]:
    spec = resolve_stage(spec_to_json(load_fleet(spec_path)), storage=Storage(pvc_mounts={}))
    return {v: spec_to_json(step_view(spec, v, expert)) for v in VIEWS}


def _edit(spec_path: Path, old: str, new: str) -> None:
    text = spec_path.read_text()
    assert old in text
    spec_path.write_text(text.replace(old, new, 1))


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {v for v in VIEWS if before[v] != after[v]}


def test_a_canary_edit_reruns_nothing_a_lora_edit_only_training_and_after(fleet: Path) -> None:
    before = _views(fleet)
    _edit(fleet, "steps: [10, 25, 50, 100]", "steps: [5, 50, 100]")
    _edit(fleet, "pause_seconds: 60", "pause_seconds: 5")
    assert _changed(before, _views(fleet)) == set()
    _edit(fleet, "    r: 16\n    alpha: 32", "    r: 8\n    alpha: 16")
    assert _changed(before, _views(fleet)) == {"train", "evaluate"}


def test_an_edited_seed_file_reruns_its_data_steps_and_the_base_by_content(fleet: Path) -> None:
    before = _views(fleet)
    seeds = fleet.parent / "data" / "job-analyzer" / "seed.jsonl"
    seeds.write_text(seeds.read_text())  # touched, same bytes: nothing
    assert _changed(before, _views(fleet)) == set()
    lines = seeds.read_text().splitlines(keepends=True)
    seeds.write_text("".join(lines[:-1]))
    assert _changed(before, _views(fleet)) == {"base", "data"}
    other = _views(fleet, "proposal-writer")
    assert json.loads(other["data"])["experts"][0]["name"] == "proposal-writer"


def test_train_and_base_views_know_the_task_by_name_only(fleet: Path) -> None:
    views = _views(fleet)
    train = json.loads(views["train"])
    assert train["tasks"] == [{**train["tasks"][0], "name": "job-analyzer"}]
    assert (
        train["tasks"][0]["metrics"] == []
        and train["canary"]
        == json.loads(spec_to_json(step_view(load_fleet(fleet), "gate", "job-analyzer")))["canary"]
    )  # defaults: the edits above never reach it
    assert json.loads(views["evaluate"])["tasks"][0]["metrics"]  # evaluation reads them all


def test_run_parameters_override_the_spec_and_digests_are_filled_in(fleet: Path) -> None:
    spec_json = spec_to_json(load_fleet(fleet))
    storage = Storage(pvc_mounts={})
    spec = resolve_stage(spec_json, "", "demo", "abc123", 0.9, storage=storage)
    assert spec.base.revision == "abc123"
    assert {e.gate.max_loss_ratio for e in spec.experts} == {0.9}
    seeds = Path(spec.experts[0].seed_data)
    assert spec.experts[0].seed_data_sha256 == hashlib.sha256(seeds.read_bytes()).hexdigest()
    with pytest.raises(SpecError, match=r"^pipeline: spec_json: give spec_json or spec_uri$"):
        resolve_stage("", "", storage=storage)


def test_the_run_can_read_its_spec_from_a_store(fleet: Path, s3_endpoint: str) -> None:
    storage = Storage(s3_endpoint_url=s3_endpoint, pvc_mounts={})
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    prefix = "views-test"
    text = fleet.read_text().replace("../runs/registry", str(fleet.parent / "registry"))
    for e in ("proposal-writer", "job-analyzer", "profile-reviewer", "candidate-evaluator"):
        for f in ("seed", "eval"):
            key = f"{prefix}/data/{e}/{f}.jsonl"
            s3.put_object(
                Bucket=S3_BUCKET,
                Key=key,
                Body=(fleet.parent / "data" / e / f"{f}.jsonl").read_bytes(),
            )
            text = text.replace(f"data/{e}/{f}.jsonl", f"s3://{S3_BUCKET}/{key}")
    text = text.replace(
        "data/job-post-writer/", str(fleet.parent / "data" / "job-post-writer") + "/"
    )
    s3.put_object(Bucket=S3_BUCKET, Key=f"{prefix}/fleet.yaml", Body=text.encode())
    spec = resolve_stage(spec_uri=f"s3://{S3_BUCKET}/{prefix}/fleet.yaml", storage=storage)
    assert spec.experts[1].seed_data == f"s3://{S3_BUCKET}/{prefix}/data/job-analyzer/seed.jsonl"
    local = fleet.parent / "data" / "job-analyzer" / "seed.jsonl"
    assert spec.experts[1].seed_data_sha256 == hashlib.sha256(local.read_bytes()).hexdigest()
    s3.put_object(Bucket=S3_BUCKET, Key=f"{prefix}/bad.yaml", Body=b"name: x\nexperts: 3\n")
    with pytest.raises(SpecError, match=rf"^s3://{S3_BUCKET}/{prefix}/bad.yaml:2: experts: "):
        resolve_stage(spec_uri=f"s3://{S3_BUCKET}/{prefix}/bad.yaml", storage=storage)


def test_a_data_path_the_step_cannot_see_is_named_with_what_to_do(fleet: Path) -> None:
    from lorafleet.errors import StorageError

    spec = load_fleet(fleet)
    missing = str(fleet.parent / "elsewhere" / "seed.jsonl")
    spec.experts[0].seed_data = missing
    with pytest.raises(StorageError) as err:
        resolve_stage(spec_to_json(spec), storage=Storage(pvc_mounts={}))
    (line,) = str(err.value).splitlines()
    assert line.startswith(f"{missing}: no such file where this step runs")
    assert "lorafleet spec stage" in line


def test_gate_overrides_set_one_experts_bar_and_mistakes_name_the_parameter(fleet: Path) -> None:
    spec_json = spec_to_json(load_fleet(fleet))
    storage = Storage(pvc_mounts={})
    overrides = '{"job-analyzer": {"max_loss_ratio": 0.8, "min_metrics": {"json_valid": 0.5}}}'
    spec = resolve_stage(spec_json, gate_overrides=overrides, storage=storage)
    gates = {e.name: e.gate for e in spec.experts}
    assert gates["job-analyzer"].max_loss_ratio == 0.8
    assert gates["job-analyzer"].min_metrics == {"json_valid": 0.5}
    assert gates["proposal-writer"].max_loss_ratio != 0.8  # the others keep the spec's
    for text, why in (
        ("{not json", "gate_overrides: not JSON"),
        ('{"poet": {}}', "gate_overrides: no expert named 'poet'"),
        ('{"job-analyzer": 3}', "gate_overrides: expected {"),
        ('{"job-analyzer": {"max_loss_ratio": -1}}', "experts.1.gate.max_loss_ratio"),
    ):
        with pytest.raises(SpecError) as err:
            resolve_stage(spec_json, gate_overrides=text, storage=storage)
        (line,) = str(err.value).splitlines()
        assert line.startswith("pipeline parameters: ") and why in line, line
