"""Checkpoints: a SIGKILLed run resumes to the same adapter; mismatches and failures are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorafleet.base import DemoBaseConfig, build_demo_base
from lorafleet.fleet import LoraSettings, TrainingSettings
from lorafleet.records import Record, dump_records
from lorafleet.train.checkpoint import latest_checkpoint
from lorafleet.train.errors import (
    NonFiniteLossError,
    QLoraUnavailableError,
    ResumeMismatchError,
    TrainingOOMError,
)
from lorafleet.train.job import TrainJobConfig, run_job
from lorafleet.train.recipe import LoRARecipe, train_adapter

LORA = LoraSettings(
    r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"]
)  # dropout: RNG state matters
# 24 records of ~25 tokens: 2 per 64-token row, 6 micro-batches per epoch, so 90 steps cross 15 epochs.
TRAINING = TrainingSettings(
    max_steps=90,
    learning_rate=5e-3,
    batch_size=2,
    packing=True,
    max_seq_len=64,
    checkpoint_every=5,
    warmup_ratio=0.1,
)


def _records(n: int = 24) -> list[Record]:
    return [
        Record(
            id=f"r{i}",
            task="chat",
            source="human",
            messages=[
                {"role": "user", "content": f"Budget of job {i}?"},
                {"role": "assistant", "content": f"It is {10 * i} dollars."},
            ],
        )
        for i in range(n)
    ]


def _adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


@pytest.mark.integration
def test_a_sigkilled_run_resumes_to_the_same_adapter(tiny_base: Path, tmp_path: Path) -> None:
    """Given a training process killed with SIGKILL after its first checkpoint, when a new
    process resumes the run, then the final adapter equals that of an uninterrupted run."""
    import torch

    train_set = dump_records(tmp_path / "train.jsonl", _records())
    job = TrainJobConfig(
        base_dir=str(tiny_base),
        train_set=str(train_set),
        output_dir=str(tmp_path / "killed"),
        threads=1,
        lora=LORA,
        training=TRAINING,
    )
    job_file = job.write(tmp_path / "job.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run_dir = tmp_path / "killed.run"

    child = subprocess.Popen([sys.executable, "-m", "lorafleet.train.job", str(job_file)], env=env)
    deadline = time.monotonic() + 120
    while (
        latest_checkpoint(run_dir) is None and child.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = json.loads((latest_checkpoint(run_dir) / "state.json").read_text())["step"]
    assert 5 <= killed_at < TRAINING.max_steps
    assert not (tmp_path / "killed").exists()

    job.model_copy(update={"resume": True}).write(job_file)
    resumed = subprocess.run(
        [sys.executable, "-m", "lorafleet.train.job", str(job_file)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr

    threads = torch.get_num_threads()
    try:  # the reference runs in this process, single-threaded like the children
        reference = run_job(job.model_copy(update={"output_dir": str(tmp_path / "whole")}))
    finally:
        torch.set_num_threads(threads)

    got, want = _adapter(tmp_path / "killed"), _adapter(tmp_path / "whole")
    assert got.keys() == want.keys() and len(want) == 8  # 2 layers x q,v x A,B
    for name in want:
        # Same ops in the same order on one CPU thread: expected bit-identical; tolerance only guards libm noise.
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-8)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, TRAINING.max_steps + 1))
    torch.testing.assert_close(
        [m["loss"] for m in lines], reference["losses"], rtol=1e-6, atol=1e-8
    )


def test_resume_is_refused_for_another_lora_config_or_base(tiny_base: Path, tmp_path: Path) -> None:
    training = TRAINING.model_copy(update={"max_steps": 6, "checkpoint_every": 2})
    train_adapter(tiny_base, _records(), LORA, training, tmp_path / "a", run_dir=tmp_path / "run")
    assert latest_checkpoint(tmp_path / "run") is not None

    other_lora = LORA.model_copy(update={"r": 8})
    with pytest.raises(ResumeMismatchError, match=r"lora: checkpoint has .*'r': 4"):
        train_adapter(
            tiny_base,
            _records(),
            other_lora,
            training,
            tmp_path / "b",
            run_dir=tmp_path / "run",
            resume=True,
        )

    other_base = build_demo_base(
        ["another corpus for another base model entirely"] * 20,
        DemoBaseConfig(
            vocab_size=300,
            hidden_size=64,
            num_layers=2,
            num_heads=2,
            num_kv_heads=1,
            intermediate_size=128,
            pretrain_steps=2,
            pretrain_seq_len=16,
        ),
        cache_dir=tmp_path / "cache",
    )
    with pytest.raises(ResumeMismatchError, match="base_fingerprint"):
        train_adapter(
            other_base,
            _records(),
            LORA,
            training,
            tmp_path / "c",
            run_dir=tmp_path / "run",
            resume=True,
        )


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    tiny_base: Path, tmp_path: Path
) -> None:
    import torch

    training = TRAINING.model_copy(update={"max_steps": 8, "checkpoint_every": 1})
    recipe = LoRARecipe(
        tiny_base, _records(), LORA, training, tmp_path / "out", run_dir=tmp_path / "run"
    )

    def blow_up(step: int, total: int, loss: float) -> None:
        if step == 2:  # a numerical blow-up in the weights, as a too-high learning rate causes
            with torch.no_grad():
                next(p for p in recipe.model.parameters() if p.requires_grad).fill_(float("nan"))

    recipe.on_step = blow_up
    recipe.setup()
    with pytest.raises(
        NonFiniteLossError,
        match=r"loss became nan at step 3; the last good checkpoint is .*step-00000002",
    ):
        recipe.train()
    assert latest_checkpoint(tmp_path / "run").name == "step-00000002"
    assert not (tmp_path / "out").exists()


def test_out_of_memory_suggests_a_smaller_micro_batch(tiny_base: Path, tmp_path: Path) -> None:
    import torch

    recipe = LoRARecipe(tiny_base, _records(), LORA, TRAINING, tmp_path / "out")
    recipe.setup()

    def no_memory(**batch):  # no GPU here: the allocator's error is raised where the forward would
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    recipe.ddp_model = no_memory
    with pytest.raises(TrainingOOMError, match=r"lower training\.batch_size"):
        recipe.train()


def test_qlora_without_gpu_or_bitsandbytes_is_a_clear_error(
    tiny_base: Path, tmp_path: Path
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: QLoRA may run")
    with pytest.raises(QLoraUnavailableError, match=r"lora\.qlora: 4-bit QLoRA needs a CUDA GPU"):
        LoRARecipe(
            tiny_base, _records(), LORA.model_copy(update={"qlora": True}), TRAINING, tmp_path
        )


def test_rng_states_round_trip_without_pickle(tmp_path: Path) -> None:
    """Given saved RNG states, when they are loaded after the generators moved on, then
    torch, Python and numpy draw exactly what they drew right after the save, and the
    checkpoint holds no pickle (a shared volume's file is never unpickled)."""
    import random

    import numpy as np
    import torch

    from lorafleet.train.checkpoint import _load_rng_state, _save_rng_state

    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    np.random.standard_normal()  # numpy's cached Gaussian is part of its state
    _save_rng_state(tmp_path)
    expected = (torch.rand(4), random.random(), np.random.standard_normal(3))
    torch.rand(100), random.random(), np.random.standard_normal(7)
    _load_rng_state(tmp_path)
    got = (torch.rand(4), random.random(), np.random.standard_normal(3))
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert got[1] == expected[1]
    np.testing.assert_array_equal(got[2], expected[2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rng.json", "rng.safetensors"]
    json.loads((tmp_path / "rng.json").read_text())  # plain JSON


def test_an_older_checkpoint_with_pickled_rng_is_refused(tmp_path: Path) -> None:
    from lorafleet.train.checkpoint import _load_rng_state

    (tmp_path / "rng.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ResumeMismatchError, match="older lorafleet"):
        _load_rng_state(tmp_path)
