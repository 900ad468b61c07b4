"""Batched generation (the evaluator's and the runtime's code path) vs one request at a time.

Same model, same prompts (the shipped eval sets), same adapters, greedy decoding; both
arms run side by side in this process and must produce identical text. Reports samples/s
and the ratio. Reproduce:

    .venv/bin/python bench/eval_bench.py                      # evaluator traffic (make bench)
    .venv/bin/python bench/eval_bench.py --traffic mixed      # runtime traffic
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _prepare(spec_path: Path, n: int, adapters_dir: Path, mixed: bool):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorafleet.chat import prompt_messages
    from lorafleet.fleet import load_fleet
    from lorafleet.records import read_records
    from lorafleet.stages import build_base

    spec = load_fleet(spec_path)
    base = build_base(spec)
    adapters = {}
    for i, e in enumerate(spec.experts):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(base)
        cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(model, cfg).save_pretrained(adapters_dir / e.name)
        adapters[e.name] = adapters_dir / e.name
    per_expert = [
        [(e.name, prompt_messages(r.messages)) for _, r in read_records(e.eval_data)]
        for e in spec.experts
    ]
    if mixed:  # round-robin over experts: every batch mixes adapters, as serving traffic does
        prompts = [p for group in zip(*per_expert, strict=False) for p in group][:n]
    else:  # expert by expert, as the evaluator runs: one adapter per batch
        prompts = [p for group in per_expert for p in group[: max(1, n // len(per_expert))]]
    return base, adapters, prompts


def main() -> None:
    import tempfile

    import torch

    from lorafleet.engine.generation import GenerationRequest, Generator
    from lorafleet.fleet import GatePolicy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "examples" / "fleet.yaml")
    parser.add_argument("--samples", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=16)
    # The gate's own generation budget by default: what the evaluator really decodes.
    parser.add_argument(
        "--max-new-tokens", type=int, default=GatePolicy.model_fields["max_new_tokens"].default
    )
    parser.add_argument(
        "--traffic",
        choices=["per-adapter", "mixed"],
        default="per-adapter",
        help="per-adapter: the evaluator's batches; mixed: the runtime's",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds of both arms; the best of each counts",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--lora-backend", choices=["batched", "peft"], default="batched")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters, prompts = _prepare(
            args.spec, args.samples, Path(tmp), args.traffic == "mixed"
        )
        gen = Generator(base, adapters, lora_backend=args.lora_backend)
        requests = [
            GenerationRequest(messages=m, adapter=a, max_new_tokens=args.max_new_tokens)
            for a, m in prompts
        ]
        gen.generate(requests[:2])  # warm-up

        # Rounds alternate the arms, so load from other jobs on the machine hits both alike;
        # the best round of each arm is its figure.
        t_one = t_batch = float("inf")
        for _ in range(args.rounds):
            start = time.perf_counter()
            one = [gen.generate([r])[0] for r in requests]
            t_one = min(t_one, time.perf_counter() - start)

            start = time.perf_counter()
            if args.traffic == "mixed":  # the runtime batches requests as they arrive
                batched = []
                for i in range(0, len(requests), args.batch_size):
                    batched += gen.generate(requests[i : i + args.batch_size])
            else:  # the evaluator's path: batches of similar prompt length
                batched = gen.generate_all(requests, args.batch_size)
            t_batch = min(t_batch, time.perf_counter() - start)

    same = sum(a.text == b.text for a, b in zip(one, batched, strict=True))
    result = {
        "bench": "eval_generation",
        "samples": len(requests),
        "adapters": len(adapters),
        "traffic": args.traffic,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "one_at_a_time_samples_per_s": round(len(requests) / t_one, 2),
        "batched_samples_per_s": round(len(requests) / t_batch, 2),
        "speedup": round(t_one / t_batch, 2),
        "identical_outputs": f"{same}/{len(requests)}",
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "lora_backend": args.lora_backend,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
