"""Per-profile Kubernetes settings: spec validation, compiled IR, and the committed goldens.

The goldens are ``examples/fleet-cluster.yaml``'s profiles compiled; regenerate them with
``make goldens`` (``UPDATE_GOLDENS=1`` on the golden tests).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from kfp.components import load_component_from_file

from lorafleet.errors import LorafleetError, SpecError
from lorafleet.fleet import (
    BASE_STEPS,
    PIPELINE_STEPS,
    BaseSpec,
    PlatformProfile,
    PvcMount,
    SecretEnv,
    StepPlatform,
    load_fleet,
)
from lorafleet.pipelines.compile import GOLDEN, compile_fleet, profile_golden
from lorafleet.pipelines.platform import spec_profile

CLUSTER_SPEC = Path(__file__).resolve().parents[2] / "examples" / "fleet-cluster.yaml"
PROFILES = ("aws", "gcp", "onprem")


def _ir(path: Path) -> tuple[dict, dict]:
    """The pipeline spec and its ``platforms.kubernetes`` executors ({} when there are none)."""
    docs = list(yaml.safe_load_all(path.read_text()))
    platform = (
        docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    )
    return docs[0], platform


def _expected(profile: PlatformProfile, step: str, base: BaseSpec | None = None) -> StepPlatform:
    """``all_steps`` and the step's own settings, as one (what the step's pod must carry);
    with ``base``, a step that loads it also mounts the model cache and gets the hub token."""
    own = profile.steps.get(step, StepPlatform())
    hub = base is not None and step in BASE_STEPS
    cache = profile.model_cache
    return StepPlatform(
        accelerator_type=own.accelerator_type or profile.all_steps.accelerator_type,
        accelerator_count=own.accelerator_count
        if own.accelerator_type
        else profile.all_steps.accelerator_count,
        node_selector={**profile.all_steps.node_selector, **own.node_selector},
        tolerations=[*profile.all_steps.tolerations, *own.tolerations],
        pvcs=[
            *profile.all_steps.pvcs,
            *own.pvcs,
            *([PvcMount(claim=cache.claim, mount_path=cache.mount_path)] if hub and cache else []),
        ],
        secrets=[
            *profile.all_steps.secrets,
            *own.secrets,
            *(
                [SecretEnv(secret=base.hub_token_secret, env={"HF_TOKEN": "HF_TOKEN"})]
                if hub and base.hub_token_secret
                else []
            ),
        ],
    )


def test_every_declared_step_is_a_task_of_the_compiled_pipeline() -> None:
    spec, _ = _ir(GOLDEN)
    executors = set(spec["deploymentSpec"]["executors"])
    assert executors == {f"exec-{step}" for step in PIPELINE_STEPS}


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_compiles_to_its_committed_golden(profile: str, tmp_path: Path) -> None:
    base = load_fleet(CLUSTER_SPEC, check_files=False).base
    fresh = compile_fleet(
        tmp_path / "p.yaml", spec_profile(CLUSTER_SPEC, profile), base=base
    ).read_text()
    golden = profile_golden(profile)
    if os.environ.get("UPDATE_GOLDENS") == "1":
        golden.write_text(fresh)
    assert golden.is_file(), "run `make goldens`"
    assert fresh == golden.read_text(), "profile pipeline changed: review, then UPDATE_GOLDENS=1"
    assert load_component_from_file(str(golden)).name == "lorafleet-fleet"


@pytest.mark.parametrize("profile", PROFILES)
def test_golden_carries_the_specs_platform_settings(profile: str) -> None:
    fleet = load_fleet(CLUSTER_SPEC, check_files=False)
    settings = fleet.pipeline.profiles[profile]
    spec, platform = _ir(profile_golden(profile))
    assert platform, "no platforms.kubernetes section"
    for step in PIPELINE_STEPS:
        want = _expected(settings, step, fleet.base)
        got = platform.get(f"exec-{step}", {})
        resources = spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"].get(
            "resources", {}
        )
        if want.accelerator_type:
            assert resources["accelerator"]["resourceType"] == want.accelerator_type
            assert int(resources["accelerator"]["resourceCount"]) == want.accelerator_count
        else:
            assert "accelerator" not in resources
        assert got.get("nodeSelector", {}).get("labels", {}) == want.node_selector
        assert [
            (t.get("key"), t["operator"], t.get("value"), t.get("effect"))
            for t in got.get("tolerations", [])
        ] == [(t.key, t.operator, t.value, t.effect) for t in want.tolerations]
        assert [(p["constant"], p["mountPath"]) for p in got.get("pvcMount", [])] == [
            (p.claim, p.mount_path) for p in want.pvcs
        ]
        assert [
            (s["secretName"], {k["secretKey"]: k["envVar"] for k in s["keyToEnv"]})
            for s in got.get("secretAsEnv", [])
        ] == [(s.secret, s.env) for s in want.secrets]


@pytest.mark.parametrize("profile", PROFILES)
def test_every_step_can_reach_the_profiles_store(profile: str) -> None:
    # The storage layer in each pod reads its S3 endpoint and its PVC mounts from the environment
    settings = load_fleet(CLUSTER_SPEC, check_files=False).pipeline.profiles[profile]
    spec, _ = _ir(profile_golden(profile))
    for step in PIPELINE_STEPS:
        container = spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        want = {"LORAFLEET_PROFILE": profile}  # the steps read serving as the profile sees it
        if settings.storage.endpoint:
            want["AWS_ENDPOINT_URL_S3"] = settings.storage.endpoint
        mounts = _expected(settings, step).pvcs
        if mounts:
            want["LORAFLEET_PVC_MOUNTS"] = ",".join(f"{m.claim}={m.mount_path}" for m in mounts)
        if settings.storage.object_store:  # where a retried step finds the work it resumes
            want["LORAFLEET_WORK_STORE"] = settings.storage.object_store.rstrip("/") + "/work"
        placed = _expected(settings, step)
        if placed.accelerator_type:  # a step given GPUs fails if it sees none (engine/devices)
            want["LORAFLEET_GPUS"] = str(placed.accelerator_count)
        if step in BASE_STEPS:  # the image is offline for local runs; these may fetch the base
            want["HF_HUB_OFFLINE"] = "0"
            if settings.model_cache:
                want["HF_HOME"] = settings.model_cache.mount_path
        assert env == want
    assert profile != "onprem" or "AWS_ENDPOINT_URL_S3" in env, "onprem's MinIO endpoint"


def test_every_profile_puts_training_on_an_accelerator() -> None:
    # Given the shipped cluster spec, when each profile is compiled, then train asks for a GPU
    for profile in PROFILES:
        spec, platform = _ir(profile_golden(profile))
        train = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"][
            "accelerator"
        ]
        assert train["resourceType"] == "nvidia.com/gpu" and int(train["resourceCount"]) >= 1
        assert platform["exec-train"]["nodeSelector"]["labels"]
        assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-gate"][
            "container"
        ].get("resources", {})


def test_unknown_step_is_rejected_with_its_line(tmp_path: Path) -> None:
    text = CLUSTER_SPEC.read_text().replace("        evaluate:\n", "        evalute:\n", 1)
    bad = tmp_path / "fleet.yaml"
    bad.write_text(text)
    with pytest.raises(SpecError) as err:
        load_fleet(bad, check_files=False)
    line = text.splitlines().index("        evalute:") + 1
    assert err.value.line is not None and abs(err.value.line - line) <= 1
    assert "steps.evalute" in str(err.value) and "train" in str(err.value)


def test_bad_toleration_operator_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.yaml"
    bad.write_text(CLUSTER_SPEC.read_text().replace("operator: Exists", "operator: Always", 1))
    with pytest.raises(
        SpecError, match=r"pipeline\.profiles\.aws\.steps\.train\.tolerations\.0\.operator"
    ):
        load_fleet(bad, check_files=False)


def test_profile_missing_from_the_spec_is_one_clear_error() -> None:
    example = CLUSTER_SPEC.with_name("fleet.yaml")
    with pytest.raises(
        SpecError, match=r"pipeline\.profiles\.aws: no such profile; the spec has: none"
    ):
        spec_profile(example, "aws")
    with pytest.raises(LorafleetError, match="needs --spec"):
        spec_profile(None, "aws")
