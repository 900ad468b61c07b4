"""The whole fleet pipeline through kfp.local, driven by the real CLI, on the smallest settings.

Run 1: one expert is gated normally and must pass, be registered (and so become
production) and answer a real HTTP chat request; the other has a bar its tiny model
cannot clear and must be stopped at the gate: nothing registered, nothing served.
Run 2: a deliberately worse candidate of the first expert (two optimizer steps) beats
nothing but the base, and must be refused against production.
Run 3: a better candidate of the first expert (three times the epochs of production's one)
passes against production and replaces it.
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
name: e2e
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
    synthesis: {{per_seed: 1, shards: 2}}
  - name: proposal-writer
    task: proposal-writer
    seed_data: {DATA}/proposal-writer/seed.jsonl
    eval_data: {DATA}/proposal-writer/eval.jsonl
    gate: {{min_metrics: {{skill_coverage: 0.99}}}}
registry: {{uri: registry}}
"""


@pytest.mark.e2e
@pytest.mark.slow
def test_fleet_pipeline_gates_registers_and_serves(tmp_path: Path, lorafleet_cli) -> None:
    (tmp_path / "fleet.yaml").write_text(SPEC)
    env = {**os.environ, "LORAFLEET_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = lorafleet_cli("run", "fleet.yaml", "--run-id", "r1", cwd=tmp_path, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "r1"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["wall_time_s"] > 0
    assert list(summary["experts"]) == ["job-analyzer", "proposal-writer"]

    good = summary["experts"]["job-analyzer"]
    assert good["gate_passed"] is True
    assert good["eval_loss_candidate"] < good["eval_loss_base"]
    assert {"json_valid", "schema_valid", "skills_f1", "token_f1", "safety_pass_rate"} <= set(
        good["metrics_candidate"]
    )
    assert (
        good["served"] is True
        and good["reply"]["status"] == 200
        and good["reply"]["model"] == "job-analyzer"
    )
    adapter = Path(good["adapter_uri"])  # a local registry: its version folder is the URI
    assert adapter == tmp_path / "registry" / "job-analyzer" / good["adapter_version"]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "lineage.json"} <= {
        p.name for p in adapter.iterdir()
    }
    lineage = json.loads((adapter / "lineage.json").read_text())
    assert (
        lineage["base"]["fingerprint"]
        and lineage["data"]["train_sha256"]
        and lineage["config"]["name"] == "job-analyzer"
        and set(lineage["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    )
    assert len(good["train"]["losses"]) == good["train"]["steps"] > 0
    # its data went through two parallel shards (ParallelFor inside the expert's branch)
    assert good["curation"]["shards"] == 2 and good["curation"]["output"]["synthetic"] > 0

    blocked = summary["experts"]["proposal-writer"]
    assert blocked["gate_passed"] is False
    assert any(r.startswith("FAIL min-skill_coverage") for r in blocked["gate_reasons"])
    assert blocked["adapter_uri"] is None and blocked["served"] is False
    registry = Registry(tmp_path / "registry")
    assert registry.experts() == ["job-analyzer"]

    html = (run / "report.html").read_text()
    assert "<svg" in html and "job-analyzer" in html and "gate failed" in html
    assert "<script" not in html and "<link" not in html  # self-contained: opens offline

    # Run 2: the same expert, deliberately undertrained; lenient against the base, strict against production.
    # The spec keeps both experts (the demo base is built from every expert's seeds), and
    # only job-analyzer runs.
    anchor = f"    eval_data: {DATA}/job-analyzer/eval.jsonl\n"
    worse = SPEC.replace(
        anchor,
        anchor
        + "    training: {max_steps: 2}\n    gate: {max_loss_ratio: 1.01, max_loss_regression: 0.0}\n",
    )
    (tmp_path / "worse.yaml").write_text(worse)
    proc = lorafleet_cli(
        "run",
        "worse.yaml",
        "--run-id",
        "r2",
        "--expert",
        "job-analyzer",
        cwd=tmp_path,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    experts = json.loads((tmp_path / "runs" / "r2" / "summary.json").read_text())["experts"]
    assert list(experts) == ["job-analyzer"]
    second = experts["job-analyzer"]
    assert second["production_version"] == good["adapter_version"]
    assert second["eval_loss_candidate"] > second["eval_loss_production"]
    assert second["gate_passed"] is False and second["served"] is False
    failed = [r for r in second["gate_reasons"] if r.startswith("FAIL")]
    assert failed and failed[0].startswith("FAIL heldout-loss-vs-production: candidate loss")
    assert registry.production("job-analyzer")["version"] == good["adapter_version"]
    assert len(registry.versions("job-analyzer")) == 1

    # Run 3: a better candidate (three epochs to production's one) passes every rule against production
    # and becomes the new production version.
    better = SPEC.replace(
        anchor,
        anchor
        + "    training: {epochs: 3, learning_rate: 0.01, batch_size: 8, max_seq_len: 384}\n",
    )
    (tmp_path / "better.yaml").write_text(better)
    proc = lorafleet_cli(
        "run",
        "better.yaml",
        "--run-id",
        "r3",
        "--expert",
        "job-analyzer",
        cwd=tmp_path,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    third = json.loads((tmp_path / "runs" / "r3" / "summary.json").read_text())["experts"][
        "job-analyzer"
    ]
    assert third["production_version"] == good["adapter_version"]
    assert third["eval_loss_candidate"] < third["eval_loss_production"]
    assert third["gate_passed"] is True, third["gate_reasons"]
    assert any(r.startswith("PASS heldout-loss-vs-production") for r in third["gate_reasons"])
    assert not [r for r in third["gate_reasons"] if r.startswith("FAIL")]
    assert (
        registry.production("job-analyzer")["version"]
        == third["adapter_version"]
        != good["adapter_version"]
    )
