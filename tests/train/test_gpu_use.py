"""Training picks CUDA when visible (bf16 where supported), honours base.dtype/revision, and a
training process given GPUs it cannot see stops with one line.

No GPU here: the CUDA case monkeypatches ``torch.cuda.is_available``/``device_count``/
``is_bf16_supported`` and stubs the model, so it checks what ``load_base`` asks transformers
for, not a real GPU run. The "given GPUs, sees none" case is real (CPU-only torch).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorafleet.engine.devices import GPUS_ENV
from lorafleet.train.recipe import load_base

SEED = Path(__file__).resolve().parents[2] / "examples" / "data" / "job-analyzer" / "seed.jsonl"


@pytest.fixture(autouse=True)
def no_gpus_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(GPUS_ENV, raising=False)


def test_load_base_on_a_visible_gpu_asks_for_bf16_and_the_revision(
    monkeypatch: pytest.MonkeyPatch, tiny_base: Path
) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    calls, moved = [], []

    class Stub:
        def to(self, device):
            moved.append(torch.device(device))
            return self

    def from_pretrained(path, **kwargs):
        calls.append(kwargs)
        return Stub()

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    load_base(tiny_base, revision="0123abc", attn_implementation="sdpa")
    assert calls and calls[0]["dtype"] is torch.bfloat16 and calls[0]["revision"] == "0123abc"
    assert moved == [torch.device("cuda:0")]
    calls.clear()
    load_base(tiny_base, dtype="float16", attn_implementation="sdpa")
    assert calls[0]["dtype"] is torch.float16


def test_load_base_on_the_cpu_honours_the_spec_dtype(tiny_base: Path) -> None:
    model, _ = load_base(tiny_base)
    assert model.dtype is torch.float32 and model.device.type == "cpu"
    model, _ = load_base(tiny_base, dtype="bfloat16")
    assert model.dtype is torch.bfloat16


def test_train_job_given_a_gpu_it_cannot_see_exits_2_with_one_line(
    tmp_path: Path, tiny_base: Path
) -> None:
    from lorafleet.train.job import TrainJobConfig

    job = TrainJobConfig(
        base_dir=str(tiny_base), train_set=str(SEED), output_dir=str(tmp_path / "out")
    ).write(tmp_path / "job.json")
    env = {k: v for k, v in os.environ.items() if k != GPUS_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "lorafleet.train.job", str(job)],
        env={**env, GPUS_ENV: "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert "LORAFLEET_GPUS=1" in lines[0] and "sees none" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_job_file_carries_the_base_revision_and_dtype_to_the_trainer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_base: Path
) -> None:
    """The torchrun and TrainJob launchers run from a job file: the spec's base.revision and
    base.dtype must reach the model load there as they do in process."""
    from lorafleet.train import recipe
    from lorafleet.train.job import TrainJobConfig, run_job

    asked = {}

    class Loaded(Exception):
        pass

    def load(path, **kwargs):
        asked.update(kwargs, path=path)
        raise Loaded

    monkeypatch.setattr(recipe, "load_base", load)
    job = TrainJobConfig(
        base_dir=str(tiny_base),
        train_set=str(SEED),
        output_dir=str(tmp_path / "out"),
        base_revision="0123abc",
        base_dtype="bfloat16",
    )
    with pytest.raises(Loaded):
        run_job(TrainJobConfig.model_validate_json(job.model_dump_json()))
    assert asked["revision"] == "0123abc" and asked["dtype"] == "bfloat16"
