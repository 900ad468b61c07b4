"""DDP under real torchrun: two CPU processes (gloo) train the same adapter as one process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorafleet.fleet import LoraSettings, TrainingSettings
from lorafleet.records import Record, dump_records
from lorafleet.train.job import TrainJobConfig, run_job
from lorafleet.train.launch import run_torchrun

# dropout 0: with dropout each rank draws masks for its own rows, so one process could not match.
LORA = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
# 24 records of ~25 tokens, 2 per 64-token row: 4 rows per global micro-batch, 2 on each rank.
TRAINING = TrainingSettings(
    max_steps=6,
    learning_rate=5e-3,
    batch_size=4,
    packing=True,
    max_seq_len=64,
    checkpoint_every=3,
    warmup_ratio=0.1,
)


def _records(n: int = 24) -> list[Record]:
    return [
        Record(
            id=f"r{i}",
            task="chat",
            source="human",
            messages=[
                {"role": "user", "content": f"Deadline of job {i}?"},
                {"role": "assistant", "content": f"In {i + 2} days."},
            ],
        )
        for i in range(n)
    ]


@pytest.mark.integration
def test_torchrun_with_two_ranks_trains_the_adapter_one_process_trains(
    tiny_base: Path, tmp_path: Path
) -> None:
    """Given a job launched by ``torchrun --nproc-per-node 2`` on CPU (gloo), when it ends,
    then rank 0 alone has written one adapter and one run directory, each step's logged loss
    and token count cover both ranks' rows (all-reduced), and the adapter equals that of a
    single process fed the same global micro-batches: the data was split across the ranks
    and their gradients were summed, so the ranks stayed in sync."""
    import torch
    from safetensors.torch import load_file

    train_set = dump_records(tmp_path / "train.jsonl", _records())
    job = TrainJobConfig(
        base_dir=str(tiny_base),
        train_set=str(train_set),
        output_dir=str(tmp_path / "ddp"),
        threads=1,
        lora=LORA,
        training=TRAINING,
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    summary = run_torchrun(job, nproc=2, env=env)  # torchrun --standalone --nproc-per-node=2
    assert summary["steps"] == TRAINING.max_steps

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "ddp.run", "train.jsonl"]
    assert sorted(p.name for p in (tmp_path / "ddp.run").iterdir()) == [
        "checkpoints",
        "job.json",
        "metrics.jsonl",
        "result.json",
    ]
    assert sorted(p.name for p in (tmp_path / "ddp.run" / "checkpoints").iterdir()) == [
        "step-00000003"
    ]
    metrics = [
        json.loads(x) for x in (tmp_path / "ddp.run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in metrics] == list(range(1, TRAINING.max_steps + 1))

    threads = torch.get_num_threads()
    try:  # the reference: one process, single-threaded like the ranks
        reference = run_job(job.model_copy(update={"output_dir": str(tmp_path / "one")}))
    finally:
        torch.set_num_threads(threads)
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [m["tokens"] for m in metrics] == [m["tokens"] for m in one]
    assert [m["label_tokens"] for m in metrics] == [m["label_tokens"] for m in one]
    # Gloo sums the two ranks' float32 gradients in another order than one backward pass:
    # rounding-level differences, which Adam carries through 6 steps.
    torch.testing.assert_close(
        [m["loss"] for m in metrics], reference["losses"], rtol=1e-5, atol=1e-6
    )
    got, want = (
        load_file(tmp_path / "ddp" / "adapter_model.safetensors"),
        load_file(tmp_path / "one" / "adapter_model.safetensors"),
    )
    assert got.keys() == want.keys() and len(want) == 8  # 2 layers x q,v x A,B
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
