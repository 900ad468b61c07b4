"""FSDP (``training.sharding: fsdp``) under real torchrun: two CPU processes (gloo) shard the
base and the adapter, and train the adapter one process trains; a killed run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lorafleet.fleet import TrainingSettings
from lorafleet.records import dump_records
from lorafleet.train.checkpoint import latest_checkpoint
from lorafleet.train.job import TrainJobConfig, run_job
from lorafleet.train.launch import run_torchrun, torchrun_command

from .test_distributed import LORA, TRAINING, _records

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}


def _fsdp(training: TrainingSettings, **update) -> TrainingSettings:
    """``training`` as two torchrun ranks sharding with FSDP (validated like a spec's)."""
    return TrainingSettings.model_validate(
        {
            **training.model_dump(),
            **update,
            "sharding": "fsdp",
            "launcher": "torchrun",
            "gpus_per_node": 2,
        }
    )


def _single_process(job: TrainJobConfig, output_dir: Path, training: TrainingSettings) -> dict:
    """The reference: the same job in this one process (no sharding), single-threaded like
    the ranks."""
    import torch

    threads = torch.get_num_threads()
    try:
        return run_job(job.model_copy(update={"output_dir": str(output_dir), "training": training}))
    finally:
        torch.set_num_threads(threads)


def _metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _config(adapter: Path) -> dict:
    """``adapter_config.json``; its target modules are a set, listed in a per-process order."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    return {**config, "target_modules": sorted(config["target_modules"])}


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


@pytest.mark.integration
def test_two_fsdp_ranks_train_the_adapter_one_process_trains(
    tiny_base: Path, tmp_path: Path
) -> None:
    """Given a job with ``sharding: fsdp`` launched by torchrun with 2 CPU ranks (gloo), when
    it ends, then rank 0 alone has written the files one process writes (adapter, metrics,
    a checkpoint whose adapter and optimizer state are whole tensors, numbered as one
    process numbers them), and every step's loss and the adapter equal one process's: FSDP
    gathered the sharded base for each layer, averaged the adapter's gradients as DDP does,
    and the recipe's scaling turned that into the global mean loss."""
    import torch

    train_set = dump_records(tmp_path / "train.jsonl", _records())
    job = TrainJobConfig(
        base_dir=str(tiny_base),
        train_set=str(train_set),
        output_dir=str(tmp_path / "fsdp"),
        threads=1,
        lora=LORA,
        training=_fsdp(TRAINING),
    )
    summary = run_torchrun(job, nproc=2, env=ENV)
    assert summary["steps"] == TRAINING.max_steps
    reference = _single_process(job, tmp_path / "one", TRAINING)
    # Rank 0 alone read the base's weights: rank 1 built it on the meta device, and got its
    # shards and its adapter's init from rank 0 (the equal losses below show they arrived).
    assert summary["weights_read_by"] == [0] and reference["weights_read_by"] == [0]
    assert len(summary["load_host_mb"]) == 2

    # Sharded: rank 0 holds half of every weight, frozen base included (rows padded to even).
    assert reference["params_per_rank"] > 0
    assert 0.5 <= summary["params_per_rank"] / reference["params_per_rank"] < 0.52
    run, one_run = tmp_path / "fsdp.run", tmp_path / "one.run"
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints",
        "job.json",
        "metrics.jsonl",
        "result.json",
    ]
    assert sorted(p.name for p in (tmp_path / "fsdp").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
    assert _config(tmp_path / "fsdp") == _config(tmp_path / "one")

    metrics, one = _metrics(run / "metrics.jsonl"), _metrics(one_run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, TRAINING.max_steps + 1))
    assert [m["tokens"] for m in metrics] == [m["tokens"] for m in one]
    assert [m["label_tokens"] for m in metrics] == [m["label_tokens"] for m in one]
    # The FLOP count ran its probe forward through the sharded model: the same count.
    assert [m["tflops"] for m in metrics] == pytest.approx([m["tflops"] for m in one], rel=1e-12)
    # As for DDP (test_distributed.py): gloo sums the ranks' float32 gradients in another
    # order than one backward pass; rounding-level differences, carried by Adam over 6 steps.
    torch.testing.assert_close(
        [m["loss"] for m in metrics], reference["losses"], rtol=1e-5, atol=1e-6
    )
    got, want = _weights(tmp_path / "fsdp"), _weights(tmp_path / "one")
    assert got.keys() == want.keys() and len(want) == 8  # 2 layers x q,v x A,B
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)

    # The checkpoint (step 3 of 6) holds what one process's holds, whole and in its layout.
    (ckpt,) = (run / "checkpoints").iterdir()
    (one_ckpt,) = (one_run / "checkpoints").iterdir()
    assert ckpt.name == one_ckpt.name == "step-00000003"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(p.name for p in one_ckpt.iterdir())
    got, want = _weights(ckpt), _weights(one_ckpt)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    got, want = (torch.load(c / "optimizer.pt", weights_only=True) for c in (ckpt, one_ckpt))
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys() and len(want["state"]) == 8
    for i in want["state"]:
        assert got["state"][i].keys() == want["state"][i].keys()
        for key in want["state"][i]:
            # Moments differ at rounding level like the weights; elementwise relative
            # differences explode where a moment is near 0, so the tolerance is relative to
            # each tensor's largest value (exp_avg_sq is ~1e-9 here: a fixed atol would pass anything).
            want_t, got_t = want["state"][i][key], got["state"][i][key]
            scale = float(want_t.abs().max())
            torch.testing.assert_close(
                got_t, want_t, rtol=1e-4, atol=1e-4 * scale, msg=f"{i}.{key}"
            )


def _rank_pids(torchrun_pid: int) -> list[int]:
    """The processes torchrun started (its ranks: each in a session of its own)."""
    pids = []
    for task in Path(f"/proc/{torchrun_pid}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


@pytest.mark.integration
def test_a_killed_fsdp_run_resumes_from_its_checkpoint(tiny_base: Path, tmp_path: Path) -> None:
    """Given a 2-rank FSDP run whose ranks are SIGKILLed after its first checkpoint, when the
    job is run again with ``resume``, then both ranks load their shards of the checkpoint
    (adapter and optimizer state) and continue from its step and data position: the metrics
    of the steps before it are the killed run's own, and every step's loss and the final
    adapter equal those of an uninterrupted run."""
    import torch

    training = _fsdp(TRAINING, max_steps=16, checkpoint_every=4)
    train_set = dump_records(tmp_path / "train.jsonl", _records())
    job = TrainJobConfig(
        base_dir=str(tiny_base),
        train_set=str(train_set),
        output_dir=str(tmp_path / "killed"),
        threads=1,
        lora=LORA,
        training=training,
    )
    run_dir = tmp_path / "killed.run"
    run_dir.mkdir()
    job_file = job.write(run_dir / "job.json")
    torchrun = subprocess.Popen(
        torchrun_command(job_file, 2),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while (
            latest_checkpoint(run_dir) is None
            and torchrun.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        ranks = _rank_pids(torchrun.pid) if torchrun.poll() is None else []
        assert len(ranks) == 2, "the run ended before its ranks could be killed"
        for pid in ranks:
            os.kill(pid, signal.SIGKILL)
        assert torchrun.wait(timeout=120) != 0
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
            torchrun.wait()
    checkpoint = latest_checkpoint(run_dir)
    state = json.loads((checkpoint / "state.json").read_text())
    killed_at = state["step"]
    assert 4 <= killed_at < training.max_steps
    assert not (tmp_path / "killed").exists()

    summary = run_torchrun(job.model_copy(update={"resume": True}), nproc=2, env=ENV)
    assert summary["steps"] == training.max_steps
    metrics = _metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, training.max_steps + 1))
    # Resumed, not restarted: the steps before the checkpoint keep the killed run's wall-clock
    # figures (a rerun of them would have measured its own).
    assert metrics[:killed_at] == state["metrics"]

    reference = _single_process(
        job,
        tmp_path / "whole",
        TRAINING.model_copy(update={"max_steps": 16, "checkpoint_every": 4}),
    )
    # As in the test above, 16 steps instead of 6: still rounding-level.
    torch.testing.assert_close(
        [m["loss"] for m in metrics], reference["losses"], rtol=1e-5, atol=1e-6
    )
    got, want = _weights(tmp_path / "killed"), _weights(tmp_path / "whole")
    assert got.keys() == want.keys() and len(want) == 8
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fsdp_needs_several_ranks_and_refuses_qlora() -> None:
    """``sharding: fsdp`` is refused where one rank would hold the whole base anyway (in
    process, or one rank in all), and with QLoRA, whose 4-bit base FSDP does not shard here:
    by the spec's settings, by the job file, and by the recipe."""
    from pydantic import ValidationError

    from lorafleet.errors import first_problem
    from lorafleet.fleet import LoraSettings
    from lorafleet.train.recipe import LoRARecipe

    for settings in (
        {"sharding": "fsdp"},
        {"sharding": "fsdp", "launcher": "torchrun", "gpus_per_node": 1},
    ):
        with pytest.raises(ValidationError) as caught:
            TrainingSettings.model_validate(settings)
        assert first_problem(caught.value, "training") == (
            "training: sharding fsdp shards the base across ranks and this run has one: use "
            "launcher torchrun or trainjob with nodes x gpus_per_node > 1, or sharding: ddp"
        )
    training = _fsdp(TRAINING)
    assert training.world_size == 2 and TRAINING.world_size == 1

    qlora = LoraSettings(qlora=True)
    with pytest.raises(ValidationError) as caught:
        TrainJobConfig(base_dir="b", train_set="t", output_dir="o", lora=qlora, training=training)
    assert first_problem(caught.value, "job") == (
        "job: training.sharding fsdp cannot shard lora.qlora's 4-bit base: set lora.qlora: "
        "false to shard the base across ranks, or sharding: ddp to train QLoRA on each GPU"
    )
    with pytest.raises(ValueError, match=r"cannot shard lora\.qlora's 4-bit base"):
        LoRARecipe("b", _records(), qlora, training, "o")
    TrainJobConfig(base_dir="b", train_set="t", output_dir="o", lora=LORA, training=training)


def test_a_spec_asking_fsdp_with_qlora_is_refused_where_it_says_so(tmp_path: Path) -> None:
    from lorafleet.errors import LorafleetError
    from lorafleet.fleet import load_fleet

    (tmp_path / "seed.jsonl").write_text("{}\n")
    (tmp_path / "eval.jsonl").write_text("{}\n")
    spec = tmp_path / "fleet.yaml"
    spec.write_text(
        "apiVersion: lorafleet/v1\nname: big\nexperts:\n"
        "  - name: job-analyzer\n    task: job-analyzer\n"
        "    seed_data: seed.jsonl\n    eval_data: eval.jsonl\n"
        "    lora: {qlora: true}\n"
        "    training: {launcher: torchrun, gpus_per_node: 2, sharding: fsdp}\n"
    )
    with pytest.raises(LorafleetError) as caught:
        load_fleet(spec)
    message = str(caught.value)
    assert "experts.0" in message and "cannot shard lora.qlora's 4-bit base" in message
    assert "\n" not in message


def _wide_base(tiny_base: Path, folder: Path) -> Path:
    """``tiny_base`` widened to about 200 MiB of float32 weights with random values (its
    tokenizer kept): large enough that host memory rises by the weights, not by noise."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_base)
    config.update(
        {
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "head_dim": 128,
        }
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(folder)
    return folder


@pytest.mark.integration
def test_fsdp_ranks_other_than_0_never_hold_the_whole_base(tiny_base: Path, tmp_path: Path) -> None:
    """Given a 2-rank FSDP job on a base of about 200 MiB, when it has run a step, then rank 0
    alone read the base's weights (rank 1 built it on the meta device and got its shards
    from rank 0), and while loading and sharding rank 0's peak host memory rose by at least
    the whole base and rank 1's by at least half a base less (it holds its half and one
    whole tensor in flight)."""
    base = _wide_base(tiny_base, tmp_path / "wide")
    weights_mib = (base / "model.safetensors").stat().st_size / 2**20
    assert weights_mib > 150
    train_set = dump_records(tmp_path / "train.jsonl", _records(8))
    job = TrainJobConfig(
        base_dir=str(base),
        train_set=str(train_set),
        output_dir=str(tmp_path / "fsdp"),
        threads=1,
        lora=LORA,
        training=_fsdp(TRAINING, max_steps=1),
    )
    summary = run_torchrun(job, nproc=2, env=ENV)
    assert summary["weights_read_by"] == [0]
    rank0, rank1 = summary["load_host_mb"]
    # Both rises include the same ~170 MiB of imports (transformers' model code, peft, FSDP)
    # and the half of the base each rank keeps; rank 0's also the whole base it read (measured
    # on 2 CPU cores: 482 and 315 MiB for 197 MiB of weights). A rank 1 that read the
    # weights too would rise as much as rank 0.
    assert rank0 >= weights_mib
    assert rank0 - rank1 > 0.5 * weights_mib
