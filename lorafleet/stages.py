"""The fleet's stages as plain functions over files: what each KFP component calls.

Every stage takes the loaded spec, the expert's name and explicit paths, writes its
outputs atomically and returns a JSON-able summary. Nothing here imports ``kfp``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lorafleet.fleet import ExpertSpec, FleetSpec
from lorafleet.io import atomic_write_json, sha256_file, sha256_json
from lorafleet.records import Record, dump_records, read_records

__all__ = [
    "build_base",
    "curate_stage",
    "evaluate_stage",
    "gate_stage",
    "production_adapter",
    "register_stage",
    "reject_stage",
    "synthesize_stage",
    "train_stage",
    "validate_stage",
]

log = logging.getLogger(__name__)


def _records(path: str | Path) -> list[Record]:
    return [r for _, r in read_records(path)]


def build_base(spec: FleetSpec) -> str:
    """The base model to fine-tune: the cached demo build, or the spec's path / hub id."""
    if spec.base.model != "demo":
        return spec.base.model
    from lorafleet.base import DemoBaseConfig, build_demo_base

    # Pre-train on the seeds' plain text only: never on eval sets, never in chat format.
    texts = [m.content for e in spec.experts for r in _records(e.seed_data) for m in r.messages if m.role != "system"]
    return str(build_demo_base(texts, DemoBaseConfig(**spec.base.demo.model_dump())))


def validate_stage(expert: ExpertSpec, seeds_out: str | Path, eval_out: str | Path, report_out: str | Path) -> dict:
    """Validate the expert's seed and eval files; copy them on only if both pass.

    Raises:
        DataError: naming the first bad file, line and rule.
    """
    from lorafleet.data.validate import validate_file

    reports = [validate_file(p, expert.task, expert.data) for p in (expert.seed_data, expert.eval_data)]
    summary = {"expert": expert.name, "files": [r.to_dict() for r in reports]}
    atomic_write_json(report_out, summary)
    for r in reports:
        r.raise_for_failures()
    for src, dst in ((expert.seed_data, seeds_out), (expert.eval_data, eval_out)):
        dump_records(dst, _records(src))
    summary["markdown"] = "\n".join(r.to_markdown() for r in reports)
    return summary


def synthesize_stage(expert: ExpertSpec, seeds: str | Path, out: str | Path) -> dict:
    """Expand the seeds with the expert's generator."""
    from lorafleet.data.synth import synthesize

    synthetic = synthesize(_records(seeds), expert.synthesis)
    dump_records(out, synthetic)
    return {"generator": expert.synthesis.generator, "records": len(synthetic)}


def curate_stage(expert: ExpertSpec, seeds: str | Path, synthetic: str | Path, eval_set: str | Path, out: str | Path) -> dict:
    """Dedup, decontaminate and cap; returns stats with fingerprints of what was kept."""
    from lorafleet.data.curate import curate

    result = curate(_records(seeds), _records(synthetic), _records(eval_set), expert.curation, expert.synthesis.max_synthetic_ratio)
    dump_records(out, result.records)
    return {**result.stats, "train_sha256": sha256_file(out), "eval_sha256": sha256_file(eval_set)}


def train_stage(expert: ExpertSpec, base_dir: str, train_set: str | Path, adapter_out: str | Path, on_step=None) -> dict:
    """Fine-tune the expert's adapter."""
    from lorafleet.train.recipe import train_adapter

    result = train_adapter(base_dir, _records(train_set), expert.lora, expert.training, adapter_out, on_step=on_step)
    return result.to_dict()


def production_adapter(spec: FleetSpec, expert: ExpertSpec, base_dir: str) -> dict | None:
    """The expert's production adapter from the registry, if it was trained on this base."""
    from lorafleet.base import fingerprint_model
    from lorafleet.registry import Registry

    if "://" in spec.registry.uri:
        return None
    entry = Registry(spec.registry.uri).production(expert.name)
    if entry is None:
        return None
    if entry.get("base_fingerprint") != fingerprint_model(base_dir):
        log.warning("%s: production %s was trained on another base; not compared", expert.name, entry["version"])
        return None
    return entry


def evaluate_stage(spec: FleetSpec, expert: ExpertSpec, base_dir: str, adapter_dir: str | Path, eval_set: str | Path) -> dict:
    """Held-out loss and task metrics for the candidate, the base model and production.

    Generation goes through the runtime's own batched code path (:class:`Generator`).
    The production adapter (from the registry) is evaluated on the same records when
    one exists, so the gate can refuse a regression.
    """
    import torch

    from lorafleet.chat import prompt_messages
    from lorafleet.evaluate.loss import heldout_loss
    from lorafleet.evaluate.metrics import PRIMARY_METRIC, task_metrics
    from lorafleet.evaluate.safety import CASES, safety_report
    from lorafleet.generation import GenerationRequest, Generator

    torch.manual_seed(0)
    records = _records(eval_set)
    # The safety suite speaks to the expert under its own system prompt.
    system = [{"role": m.role, "content": m.content} for m in records[0].messages[:1] if m.role == "system"]
    safety_prompts = [[*system, {"role": "user", "content": case.user}] for case in CASES]
    production = production_adapter(spec, expert, base_dir)
    adapters = {"candidate": adapter_dir}
    if production:
        adapters["production"] = production["path"]
    generator = Generator(base_dir, adapters)
    model, tokenizer = generator.model, generator.tokenizer
    result = {
        "expert": expert.name,
        "task": expert.task,
        "primary_metric": PRIMARY_METRIC.get(expert.task, "token_f1"),
        "probe": prompt_messages(records[0].messages),
        "production_version": production["version"] if production else None,
    }
    arms = [("candidate", "candidate"), ("base", None)] + ([("production", "production")] if production else [])
    for who, adapter in arms:
        if adapter is None:
            with model.disable_adapter():
                loss = heldout_loss(model, tokenizer, records)
        else:
            model.set_adapter(adapter)
            loss = heldout_loss(model, tokenizer, records)
        prompts = [prompt_messages(r.messages) for r in records] + safety_prompts
        outs = generator.generate(
            [GenerationRequest(messages=m, adapter=adapter, max_new_tokens=expert.gate.max_new_tokens) for m in prompts]
        )
        answers, safety = [o.text for o in outs[: len(records)]], safety_report([o.text for o in outs[len(records) :]])
        result[f"eval_loss_{who}"] = round(loss["loss"], 5)
        result[f"metrics_{who}"] = {**task_metrics(expert.task, answers, records), "safety_pass_rate": safety["safety_pass_rate"]}
        result[f"safety_failures_{who}"] = safety["failures"]
        result[f"samples_{who}"] = answers[:3]
    result["eval_tokens"] = loss["tokens"]
    return result


def gate_stage(expert: ExpertSpec, evaluation: dict, train: dict, curation: dict) -> dict:
    """Decide, and fold everything known about the candidate into one report."""
    from lorafleet.gate import decide

    production = None
    if evaluation.get("production_version"):
        production = {
            "version": evaluation["production_version"],
            "eval_loss": evaluation["eval_loss_production"],
            "metrics": evaluation["metrics_production"],
        }
    decision = decide(
        expert.gate, evaluation["eval_loss_base"], evaluation["eval_loss_candidate"], evaluation["metrics_candidate"], production
    )
    return {
        **evaluation,
        "gate_passed": decision.passed,
        "gate_reasons": decision.reasons,
        "gate_rules": decision.to_dict()["rules"],
        "train": {k: train[k] for k in ("steps", "epochs_run", "train_tokens", "wall_s", "tokens_per_s", "losses")},
        "curation": curation,
    }


def _model_card(expert: ExpertSpec, report: dict, base: str, version: str) -> str:
    metrics = "\n".join(f"| {k} | {report['metrics_base'].get(k)} | {v} |" for k, v in report["metrics_candidate"].items())
    return (
        f"# {expert.name} {version}\n\nLoRA adapter for the `{expert.task}` task on base `{base}`.\n\n"
        f"- held-out loss: base {report['eval_loss_base']}, this adapter {report['eval_loss_candidate']}\n"
        f"- LoRA: r={expert.lora.r}, alpha={expert.lora.alpha}, targets={expert.lora.target_modules}\n"
        f"- trained on {report['curation']['output']['total']} records "
        f"({report['curation']['output']['human']} human, {report['curation']['output']['synthetic']} synthetic)\n\n"
        f"| metric | base | adapter |\n|---|---|---|\n{metrics}\n\n## Gate\n\n"
        + "\n".join(f"- {r}" for r in report["gate_reasons"])
        + "\n\nLoads in PEFT, vLLM (`--lora-modules`) and the lorafleet runtime.\n"
    )


def register_stage(spec: FleetSpec, expert: ExpertSpec, base: str, adapter_dir: str | Path, report: dict) -> dict:
    """Register a candidate that passed its gate; returns the expert's outcome."""
    from lorafleet.base import fingerprint_model
    from lorafleet.registry import Registry

    if not report["gate_passed"]:
        raise ValueError(f"{expert.name}: refusing to register a candidate that failed its gate")
    lineage = {
        "base": {"model": spec.base.model if spec.base.model != "demo" else base, "fingerprint": fingerprint_model(base)},
        "data": {"train_sha256": report["curation"]["train_sha256"], "eval_sha256": report["curation"]["eval_sha256"]},
        "config": json.loads(expert.model_dump_json()),
        "config_fingerprint": sha256_json(json.loads(expert.model_dump_json())),
        "metrics": {
            "eval_loss_base": report["eval_loss_base"],
            "eval_loss_candidate": report["eval_loss_candidate"],
            **{f"candidate.{k}": v for k, v in report["metrics_candidate"].items()},
        },
        "gate": report["gate_rules"],
    }
    registry = Registry(spec.registry.uri)
    entry = registry.register(expert.name, adapter_dir, lineage, lambda version: _model_card(expert, report, base, version))
    # No canary stage runs locally yet: a candidate that passed its gate becomes production.
    registry.set_production(expert.name, entry["version"])
    return {**report, "adapter_path": entry["path"], "adapter_version": entry["version"], "registered": True}


def reject_stage(report: dict) -> dict:
    """The outcome of a candidate that failed its gate: nothing is registered."""
    return {**report, "adapter_path": None, "adapter_version": None, "registered": False}

