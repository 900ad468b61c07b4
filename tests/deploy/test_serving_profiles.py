"""``serving.profiles``: one spec that serves on several cluster profiles.

Each profile's entry replaces the serving settings it gives (storage identity, base and
adapter URIs, GPU node labels...) when the fleet is rendered, validated or deployed for that
profile; a problem in them is named under ``serving.profiles.<profile>``, on its line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorafleet.deploy.render import render, serving_problems
from lorafleet.errors import LorafleetError, SpecError
from lorafleet.fleet import PROFILE_ENV, FleetSpec, load_fleet, spec_to_json
from lorafleet.stages import resolve_stage
from lorafleet.storage import Storage

ADAPTERS = {"proposal-writer": "v1"}
SERVING = {
    "runtime": "vllm",
    "profile": "onprem",
    "gpus": 2,
    "base_uri": "pvc://models/base",
    "adapter_store": "pvc://models/adapters",
    "storage": {"pvc": "models"},
    "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "profiles": {
        "aws": {
            "base_uri": "s3://ml/models/base",
            "adapter_store": "s3://ml/adapters",
            "storage": {"role_arn": "arn:aws:iam::123456789012:role/serving"},
            "node_selector": {"node.kubernetes.io/instance-type": "p5.48xlarge"},
        },
        "gcp": {
            "gpus": 4,
            "base_uri": "gs://ml/models/base",
            "adapter_store": "gs://ml/adapters",
            "storage": {"gcp_service_account": "sa@p.iam.gserviceaccount.com"},
        },
    },
}


def _spec(serving: dict) -> FleetSpec:
    return FleetSpec.model_validate(
        {
            "name": "fleet",
            "base": {"model": "meta-llama/Llama-3.1-8B-Instruct", "revision": "abc123"},
            "experts": [
                {
                    "name": "proposal-writer",
                    "task": "proposal-writer",
                    "seed_data": "seed.jsonl",
                    "eval_data": "eval.jsonl",
                }
            ],
            "serving": serving,
            "registry": {"uri": "s3://ml/registry"},
        }
    )


def _isvc(objects: list[dict]) -> dict:
    [isvc] = [o for o in objects if o["kind"] == "InferenceService"]
    return isvc["spec"]["predictor"]


def test_a_profiles_entry_replaces_what_it_gives_and_nothing_else() -> None:
    spec = _spec(SERVING)
    aws = spec.on_profile("aws").serving
    assert (aws.profile, aws.profiles) == ("aws", {})
    assert (aws.base_uri, aws.adapter_store) == ("s3://ml/models/base", "s3://ml/adapters")
    # storage is replaced whole: onprem's PVC does not leak into the aws identity
    assert (aws.storage.role_arn, aws.storage.pvc) == ("arn:aws:iam::123456789012:role/serving", "")
    assert aws.gpus == 2 and aws.runtime == "vllm"  # not given: the block's own
    onprem = spec.on_profile("onprem").serving
    assert onprem.base_uri == "pvc://models/base" and onprem.storage.pvc == "models"
    assert spec.on_profile("gcp").serving.on("gcp") == spec.on_profile("gcp").serving


def test_render_uses_the_profiles_storage_identity_and_nodes() -> None:
    spec = _spec(SERVING)
    aws = render(spec, "aws", ADAPTERS)
    predictor = _isvc(aws)
    uris = {u["mountPath"]: u["uri"] for u in predictor["storageUris"]}
    assert uris == {
        "/mnt/models/base": "s3://ml/models/base",
        "/mnt/models/adapters": "s3://ml/adapters",
    }
    assert predictor["nodeSelector"] == {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    accounts = [o for o in aws if o["kind"] == "ServiceAccount"]
    assert any(
        a["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn")
        == "arn:aws:iam::123456789012:role/serving"
        for a in accounts
    )
    gcp = _isvc(render(spec, "gcp", ADAPTERS))
    args = gcp["model"]["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "4"
    onprem = _isvc(render(spec, "onprem", ADAPTERS))
    assert {u["uri"] for u in onprem["storageUris"]} == {
        "pvc://models/base",
        "pvc://models/adapters",
    }
    assert (
        onprem["model"]["args"][onprem["model"]["args"].index("--tensor-parallel-size") + 1] == "2"
    )


def test_problems_name_the_profiles_entry_when_it_sets_the_field() -> None:
    serving = {**SERVING, "profiles": {"aws": {"storage": {"s3_endpoint": "http://x:9000"}}}}
    spec = _spec(serving)
    problems = dict(serving_problems(spec, "aws"))
    # the aws entry gives storage (without role_arn): named there ...
    assert "required for profile aws" in problems["serving.profiles.aws.storage.role_arn"]
    # ... and the URIs it does not give are the block's own pvc:// ones, named as such
    assert "cannot be read on profile aws" in problems["serving.base_uri"]
    assert "cannot be read on profile aws" in problems["serving.adapter_store"]
    with pytest.raises(LorafleetError, match=r"^serving\.profiles\.aws\.storage\.role_arn: "):
        render(spec, "aws", ADAPTERS)
    assert serving_problems(spec, "onprem") == []


def test_a_profiles_entry_that_breaks_a_serving_rule_is_refused_on_its_line(tmp_path: Path) -> None:
    raw = {
        "name": "fleet",
        "experts": [
            {
                "name": "proposal-writer",
                "task": "proposal-writer",
                "seed_data": "s.jsonl",
                "eval_data": "e.jsonl",
            }
        ],
        "serving": {"profiles": {"gcp": {"gpus": 2}}},  # the lorafleet runtime: one device
    }
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(SpecError) as err:
        load_fleet(path, check_files=False)
    message = str(err.value)
    assert message.startswith(f"{path}:")
    assert "profiles.gcp: gpus 2: the lorafleet runtime serves on one device" in message
    raw["serving"] = {"profiles": {"gcp": {"runtime": "vllm"}}}  # not a per-profile setting
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(SpecError, match=r"serving\.profiles\.gcp\.runtime: unknown field"):
        load_fleet(path, check_files=False)


def test_a_compiled_step_reads_serving_as_its_profile_sees_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = _spec(SERVING)
    spec_json = spec_to_json(spec)
    storage = Storage(pvc_mounts={})
    monkeypatch.setenv(PROFILE_ENV, "aws")
    resolved = resolve_stage(spec_json, storage=storage, experts=[])
    # register copies the version to this store; deploy loads the candidate from it
    assert resolved.serving.adapter_store == "s3://ml/adapters"
    assert resolved.serving.profile == "aws"
    monkeypatch.delenv(PROFILE_ENV)
    assert resolve_stage(spec_json, storage=storage, experts=[]).serving.adapter_store == (
        "pvc://models/adapters"
    )


def test_spec_check_holds_every_profile_the_spec_names(tmp_path: Path) -> None:
    for name in ("seed.jsonl", "eval.jsonl"):
        (tmp_path / name).write_text("")
    raw = json.loads(spec_to_json(_spec(SERVING)))
    raw["serving"]["profiles"]["aws"]["storage"] = {"s3_endpoint": "http://minio:9000"}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    done = subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", "spec", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    line = next(
        n
        for n, text in enumerate(path.read_text().splitlines(), 1)
        if text.strip() == "s3_endpoint: http://minio:9000"
    )
    # onprem (serving.profile) and gcp render; aws lacks its identity, named on its line
    assert f"{path}:{line}: serving.profiles.aws.storage.role_arn: required" in done.stderr
