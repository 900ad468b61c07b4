"""bench/train_bench.py runs its GPU configuration (a Llama built from config, FLOPs, MFU)
end to end: here on CPU with a small shape, so the mode a GPU task measures is known to work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 4608,
}


@pytest.mark.slow
def test_the_llama_mode_reports_flops_and_mfu_for_both_sides(tmp_path: Path) -> None:
    env = {**os.environ, "LORAFLEET_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "train_bench.py"),
        "--model",
        "llama-1b",
        "--shape",
        json.dumps(SHAPE),
        "--epochs",
        "1",
        "--limit",
        "16",
        "--peak-tflops",
        "0.25",
        "--workdir",
        str(tmp_path / "work"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["model"] == {"name": "llama-1b", "shape": SHAPE, "peak_tflops": 0.25}
    base = json.loads(
        (next((tmp_path / "cache" / "base").glob("bench-llama-*")) / "config.json").read_text()
    )
    assert {k: base[k] for k in SHAPE} == SHAPE  # the model really has the asked shape
    recipe, baseline = result["recipe"], result["baseline"]
    assert recipe["real_tokens"] == baseline["real_tokens"] > 0  # same data, padding not counted
    for side in (recipe, baseline):
        assert side["model_tflop"] > 0
        assert side["tflops_per_s"] == pytest.approx(
            side["model_tflop"] / side["train_s"], rel=0.01
        )
        assert side["mfu"] == pytest.approx(side["tflops_per_s"] / 0.25, rel=0.01)
    # Same tokens, but the recipe computes LM-head logits only where the next token is a label.
    assert recipe["model_tflop"] < baseline["model_tflop"]
    assert set(result["ratio"]) >= {"tokens_per_s", "eval_loss_delta", "peak_rss"}
