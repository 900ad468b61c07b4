"""How many GPUs each compiled step is told it has (``LORAFLEET_GPUS``), from its profile."""

from __future__ import annotations

from lorafleet.engine.devices import GPUS_ENV
from lorafleet.fleet import PlatformProfile
from lorafleet.pipelines.platform import step_env, step_gpus


def _profile(**steps: dict) -> PlatformProfile:
    return PlatformProfile.model_validate({"all_steps": steps.pop("all_steps", {}), "steps": steps})


def test_a_step_is_told_the_gpus_its_own_settings_give_it() -> None:
    profile = _profile(train={"accelerator_type": "nvidia.com/gpu", "accelerator_count": 4})
    assert step_gpus(profile, "train") == 4
    assert step_env(profile, "train")[GPUS_ENV] == "4"
    assert step_gpus(profile, "gate") == 0 and GPUS_ENV not in step_env(profile, "gate")


def test_the_steps_own_accelerator_wins_over_all_steps() -> None:
    profile = _profile(
        all_steps={"accelerator_type": "nvidia.com/gpu", "accelerator_count": 1},
        evaluate={"accelerator_type": "amd.com/gpu", "accelerator_count": 2},
    )
    assert step_gpus(profile, "evaluate") == 2
    assert step_gpus(profile, "gate") == 1


def test_an_accelerator_that_is_not_a_gpu_sets_nothing() -> None:
    profile = _profile(train={"accelerator_type": "google.com/tpu", "accelerator_count": 4})
    assert step_gpus(profile, "train") == 0
    assert GPUS_ENV not in step_env(profile, "train")
