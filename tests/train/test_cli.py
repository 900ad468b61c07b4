"""``lorafleet train run``: the expert's spec settings drive a real training run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lorafleet.cli import app
from lorafleet.errors import LorafleetError
from lorafleet.records import Record, dump_records


def _spec(tmp_path: Path, training: dict) -> Path:
    records = [
        Record(
            id=f"r{i}",
            task="chat",
            source="human",
            messages=[
                {"role": "user", "content": f"Rate for job {i}?"},
                {"role": "assistant", "content": f"{20 + i} an hour."},
            ],
        )
        for i in range(8)
    ]
    dump_records(tmp_path / "seed.jsonl", records)
    dump_records(tmp_path / "eval.jsonl", records[:2])
    spec = tmp_path / "fleet.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "lorafleet/v1",
                "name": "marketplace",
                "experts": [
                    {
                        "name": "rates",
                        "task": "chat",
                        "seed_data": "seed.jsonl",
                        "eval_data": "eval.jsonl",
                        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                        "training": training,
                    }
                ],
            }
        )
    )
    return spec


def test_train_run_trains_the_expert_with_its_spec_settings(
    tiny_base: Path, tmp_path: Path
) -> None:
    spec = _spec(tmp_path, {"max_steps": 3, "batch_size": 4, "packing": True, "max_seq_len": 128})
    out = tmp_path / "adapter"
    args = [
        "train",
        "run",
        str(spec),
        "--expert",
        "rates",
        "--base",
        str(tiny_base),
        "--train-set",
        str(tmp_path / "seed.jsonl"),
        "--output",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"{out}: 3 steps" in result.output
    assert (
        "model TFLOP/s" in result.output and "MFU" not in result.output
    )  # a CPU has no known peak
    assert (out / "adapter_model.safetensors").is_file()
    assert len((tmp_path / "adapter.run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_train_run_sends_a_cluster_expert_to_submit(tmp_path: Path) -> None:
    cluster = {
        "image": "registry.example/lorafleet:0.1.0",
        "volume": {"claim": "data", "mount_path": "/data"},
    }
    spec = _spec(tmp_path, {"launcher": "trainjob", "nodes": 2, "cluster": cluster})
    args = [
        "train",
        "run",
        str(spec),
        "--expert",
        "rates",
        "--base",
        "/data/base",
        "--train-set",
        "/data/train.jsonl",
        "--output",
        "/data/out",
    ]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, LorafleetError)
    with pytest.raises(
        LorafleetError,
        match=r"experts.rates.training.launcher is 'trainjob': use `lorafleet train submit`",
    ):
        raise result.exception


def test_a_bad_job_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    from lorafleet.train.job import main

    bad = tmp_path / "job.json"
    bad.write_text('{"base_dir": "/data/base", "train_set": "/data/train.jsonl"}')
    with pytest.raises(SystemExit) as exited:
        main([str(bad)])
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"error: {bad}: output_dir: Field required\n"

    monkeypatch.delenv("LORAFLEET_TRAIN_JOB", raising=False)
    with pytest.raises(SystemExit):
        main(["--env", "LORAFLEET_TRAIN_JOB"])
    assert capsys.readouterr().err == "error: $LORAFLEET_TRAIN_JOB: no such environment variable\n"


def test_train_submit_dry_run_prints_the_trainjob(tmp_path: Path) -> None:
    import json

    cluster = {
        "image": "registry.example/lorafleet:0.1.0",
        "volume": {"claim": "data", "mount_path": "/data"},
    }
    spec = _spec(
        tmp_path, {"launcher": "trainjob", "nodes": 2, "gpus_per_node": 8, "cluster": cluster}
    )
    args = [
        "train",
        "submit",
        str(spec),
        "--expert",
        "rates",
        "--base",
        "/data/base",
        "--train-set",
        "/data/train.jsonl",
        "--output",
        "/data/out",
        "--name",
        "lf-rates",
        "--dry-run",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    job = json.loads(result.output)
    assert (job["kind"], job["metadata"]["name"], job["spec"]["trainer"]["numNodes"]) == (
        "TrainJob",
        "lf-rates",
        2,
    )


def test_train_submit_gives_a_hub_base_its_revision_dtype_and_token(tmp_path: Path) -> None:
    """A gated hub base trains on the cluster as in the pipeline: the job file names the
    spec's revision and dtype, and the pods get HF_TOKEN from base.hub_token_secret."""
    import json

    cluster = {
        "image": "registry.example/lorafleet:0.1.0",
        "volume": {"claim": "data", "mount_path": "/data"},
    }
    spec = _spec(tmp_path, {"launcher": "trainjob", "nodes": 1, "cluster": cluster})
    text = yaml.safe_load(spec.read_text())
    text["base"] = {
        "model": "org/gated-8b",
        "revision": "v2",
        "dtype": "bfloat16",
        "hub_token_secret": "hf-token",
    }
    spec.write_text(yaml.safe_dump(text))
    args = ["train", "submit", str(spec), "--expert", "rates", "--base", "org/gated-8b"]
    args += ["--train-set", "/data/train.jsonl", "--output", "/data/out", "--dry-run"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    trainer = json.loads(result.output)["spec"]["trainer"]
    env = {e["name"]: e for e in trainer["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-token"
    shipped = json.loads(
        next(v["value"] for k, v in env.items() if "value" in v and "{" in v["value"])
    )
    assert (shipped["base_revision"], shipped["base_dtype"]) == ("v2", "bfloat16")
