"""A hub base in the compiled pipeline: the steps that load it may reach the hub, get the base's
token from its Secret and share the profile's model cache; the others get none of it.

No hub is reachable here: where a step's environment is put to work, a local directory laid
out as huggingface_hub's cache stands in for what the hub would have downloaded into it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorafleet.errors import SpecError
from lorafleet.fleet import BASE_STEPS, PIPELINE_STEPS, BaseSpec, PlatformProfile, load_fleet
from lorafleet.pipelines.compile import GOLDEN, compile_fleet
from lorafleet.pipelines.platform import step_env

CLUSTER_SPEC = Path(__file__).resolve().parents[2] / "examples" / "fleet-cluster.yaml"
BASE = BaseSpec(model="meta-llama/Llama-3.1-8B-Instruct", hub_token_secret="hf-token")


def _compiled(path: Path) -> tuple[dict, dict]:
    """Container env by step, and platforms.kubernetes executors by step, of one IR."""
    docs = list(yaml.safe_load_all(path.read_text()))
    executors = docs[0]["deploymentSpec"]["executors"]
    env = {
        name.removeprefix("exec-"): {e["name"]: e["value"] for e in ex["container"].get("env", [])}
        for name, ex in executors.items()
    }
    kube = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if docs[1:] else {}
    return env, {name.removeprefix("exec-"): settings for name, settings in kube.items()}


def _profile(**fields) -> PlatformProfile:
    return PlatformProfile.model_validate(fields)


def test_steps_that_load_the_base_get_the_hub_token_and_the_cache(tmp_path: Path) -> None:
    # Given a profile with a model cache, and a gated hub base whose token is in hf-token
    profile = _profile(model_cache={"claim": "hf-cache", "mount_path": "/cache"})
    # When the pipeline is compiled for it
    env, kube = _compiled(compile_fleet(tmp_path / "p.yaml", profile, base=BASE))
    assert set(env) == set(PIPELINE_STEPS)
    for step in PIPELINE_STEPS:
        mounts = kube.get(step, {}).get("pvcMount", [])
        secrets = kube.get(step, {}).get("secretAsEnv", [])
        if step in BASE_STEPS:
            # Then they may fetch it, into the shared cache, with the token (an optional
            # Secret: a public base needs none)
            assert env[step]["HF_HUB_OFFLINE"] == "0" and env[step]["HF_HOME"] == "/cache"
            assert [(m["constant"], m["mountPath"]) for m in mounts] == [("hf-cache", "/cache")]
            assert [(s["secretName"], s["keyToEnv"], s.get("optional")) for s in secrets] == [
                ("hf-token", [{"secretKey": "HF_TOKEN", "envVar": "HF_TOKEN"}], True)
            ]
        else:
            # and no other step holds the token or the cache
            assert not {"HF_HUB_OFFLINE", "HF_HOME"} & set(env[step]), step
            assert not mounts and not secrets, step


def test_no_token_and_no_cache_still_lets_a_public_base_be_fetched(tmp_path: Path) -> None:
    env, kube = _compiled(compile_fleet(tmp_path / "p.yaml", _profile(), base=BaseSpec()))
    for step in BASE_STEPS:
        assert env[step]["HF_HUB_OFFLINE"] == "0" and "HF_HOME" not in env[step]
        assert "secretAsEnv" not in kube.get(step, {}) and "pvcMount" not in kube.get(step, {})


def test_an_offline_cache_keeps_the_steps_off_the_hub() -> None:
    # Given a cache filled ahead on a cluster with no way out
    profile = _profile(model_cache={"claim": "hf-cache", "offline": True})
    env = step_env(profile, "train")
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_HOME"] == "/mnt/hf-cache"


def test_local_runs_stay_offline() -> None:
    # The committed pipeline (no profile) sets nothing: the image's HF_HUB_OFFLINE=1 holds.
    env, kube = _compiled(GOLDEN)
    assert not any({"HF_HUB_OFFLINE", "HF_HOME"} & set(e) for e in env.values())
    assert kube == {}


@pytest.mark.parametrize(
    ("pvcs", "message"),
    [
        (
            {"all_steps": {"pvcs": [{"claim": "hf-cache", "mount_path": "/data"}]}},
            "model_cache.claim: 'hf-cache' is also in all_steps.pvcs",
        ),
        (
            {"steps": {"train": {"pvcs": [{"claim": "data", "mount_path": "/mnt/hf-cache"}]}}},
            "model_cache.mount_path: steps.train.pvcs mounts 'data' at /mnt/hf-cache too",
        ),
    ],
)
def test_a_cache_that_collides_with_a_mount_is_refused_with_its_field(
    tmp_path: Path, pvcs: dict, message: str
) -> None:
    raw = yaml.safe_load(CLUSTER_SPEC.read_text())
    profile = raw["pipeline"]["profiles"]["aws"]
    profile["model_cache"] = {"claim": "hf-cache"}
    for layer, settings in pvcs.items():
        if layer == "all_steps":
            profile.setdefault("all_steps", {}).update(settings)
        else:
            for step, own in settings.items():
                profile["steps"][step].update(own)
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(SpecError) as err:
        load_fleet(tmp_path / "fleet.yaml", check_files=False)
    text = str(err.value)
    assert "pipeline.profiles.aws" in text and message in text and "\n" not in text


def test_the_steps_env_finds_a_hub_base_in_the_cache(tmp_path: Path) -> None:
    """The compiled train step's environment, put to work in a fresh process: the cache at the
    model cache's mount path is where huggingface_hub looks, and a hub base found there is
    fingerprinted with the commit its revision names, as build-base and register do."""
    from lorafleet.base import fingerprint_model

    cache = tmp_path / "hf-cache"
    repo = cache / "hub" / "models--acme--tiny"
    commit = "c0ffee" * 6 + "c0ff"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text(
        json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4})
    )
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    profile = _profile(model_cache={"claim": "hf-cache", "mount_path": str(cache)})
    env, _ = _compiled(compile_fleet(tmp_path / "p.yaml", profile, base=BASE))
    probe = (
        "import json, huggingface_hub.constants as c\n"
        "from transformers import AutoConfig\n"
        "from lorafleet.base import fingerprint_model\n"
        f"config = AutoConfig.from_pretrained('acme/tiny', revision='{commit}')\n"
        "print(json.dumps({'offline': c.HF_HUB_OFFLINE, 'cache': c.HF_HUB_CACHE,\n"
        "    'hidden': config.hidden_size, 'fingerprint': fingerprint_model('acme/tiny')}))\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env={**clean, **env["train"]},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["offline"] is False and seen["cache"] == str(cache / "hub")
    assert seen["hidden"] == 64
    # the same fingerprint as a step that knows the commit: read from the cache's refs/main
    assert seen["fingerprint"] == fingerprint_model("acme/tiny", commit)
