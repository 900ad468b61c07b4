"""One expert's failure inside the fleet pipeline, through kfp.local and the real CLI.

proposal-writer's eval set is its seed set: curation drops every seed row as eval overlap
(and it synthesizes nothing), so its training step has no record to learn from and fails.
job-analyzer must still be trained, gated, registered and served by ``publish``; the run
then ends with exit code 1 and one line naming proposal-writer, its step and its error, and
the run folder holds both experts' summary and report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorafleet.registry import Registry

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"

SPEC = f"""\
apiVersion: lorafleet/v1
name: e2e-failure
base:
  model: demo
  demo: {{vocab_size: 512, hidden_size: 64, num_layers: 2, num_heads: 2, num_kv_heads: 1,
          intermediate_size: 128, pretrain_steps: 30, pretrain_seq_len: 64}}
expert_defaults:
  synthesis: {{per_seed: 1}}
  lora: {{r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear}}
  training: {{epochs: 1, learning_rate: 0.01, batch_size: 8, max_seq_len: 384}}
  gate: {{max_loss_ratio: 0.99, max_new_tokens: 8}}
experts:
  - name: job-analyzer
    task: job-analyzer
    seed_data: {DATA}/job-analyzer/seed.jsonl
    eval_data: {DATA}/job-analyzer/eval.jsonl
  - name: proposal-writer
    task: proposal-writer
    seed_data: {DATA}/proposal-writer/seed.jsonl
    eval_data: {DATA}/proposal-writer/seed.jsonl
    synthesis: {{generator: none}}
registry: {{uri: registry}}
"""


@pytest.mark.e2e
@pytest.mark.slow
def test_a_failed_expert_does_not_stop_the_others(tmp_path: Path, lorafleet_cli) -> None:
    (tmp_path / "fleet.yaml").write_text(SPEC)
    env = {**os.environ, "LORAFLEET_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = lorafleet_cli("run", "fleet.yaml", "--run-id", "r1", cwd=tmp_path, env=env, timeout=900)

    # The run fails, in one line naming the failed expert, its step and its error
    run = tmp_path / "runs" / "r1"
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: 1 of 2 experts failed: proposal-writer (train: ValueError: no training "
        f"records). The others' results: {Path('runs/r1/summary.json')}, "
        f"{Path('runs/r1/report.html')}; full log: {Path('runs/r1/pipeline.log')}"
    ]
    # and the healthy expert was still gated, registered and served
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["experts"]) == ["job-analyzer", "proposal-writer"]
    good = summary["experts"]["job-analyzer"]
    assert good["gate_passed"] is True and good["registered"] is True
    assert good["served"] is True and good["reply"]["model"] == "job-analyzer"
    assert Registry(tmp_path / "registry").experts() == ["job-analyzer"]
    # while the failed one is listed with its error, nothing registered or served
    failed = summary["experts"]["proposal-writer"]
    assert failed["failure"] == {
        "expert": "proposal-writer",
        "stage": "train",
        "error": "ValueError: no training records",
    }
    assert summary["failed"] == {"proposal-writer": failed["failure"]}
    assert (failed["registered"], failed["served"], failed["adapter_uri"]) == (False, False, None)
    html = (run / "report.html").read_text()
    assert "failed in train" in html and "ValueError: no training records" in html
    # and the terminal showed the table of both before the error (the console is stderr)
    table = proc.stderr.partition("error: ")[0]
    assert "job-analyzer" in table and "FAILED (train)" in table
