"""Serving eight adapters: the runtime's mixed batches vs one request at a time vs one adapter.

One base (the demo shape of ``examples/fleet.yaml``: 256 hidden, 4 layers), eight random
rank-8 LoRA adapters on q/k/v/o, and one request trace: N chat requests, round-robin over
the adapters, all arriving at once (a burst), greedy, ``--max-new-tokens`` each. Three
arms run side by side in this process on the same model:

(a) the runtime's :class:`~lorafleet.serve.batching.MicroBatcher`: mixed-adapter batches;
(b) naive serving: one request at a time, the adapter switched per request (batch of 1);
(c) the runtime with the whole trace sent to one adapter.

(a) and (b) must produce identical text. Latency is measured from the burst to each
request's answer. Memory: bytes of the weights resident in (i) the base with all eight
adapters loaded and (ii) one merged model (base + one adapter, merged), and the RSS of a
fresh process holding each. Reproduce:

    .venv/bin/python bench/serve_bench.py                 # 128 requests, 16 new tokens
    .venv/bin/python bench/serve_bench.py --requests 256 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ADAPTERS = 8
CORPUS = [
    "A client posts a job for a data engineer who knows Python and SQL.",
    "The freelancer writes a short proposal that answers every question in the post.",
    "A good profile lists recent work, rates and the hours the freelancer can give.",
    "The job analyzer reads the post and names the skills, the budget and the deadline.",
    "Candidates are compared on skills, reviews and how well they read the brief.",
] * 20


def _build(root: Path) -> tuple[Path, dict[str, Path]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorafleet.base import DemoBaseConfig, build_demo_base

    # The demo fleet's shape; a few pre-training steps (speed does not depend on them).
    cfg = DemoBaseConfig(pretrain_steps=10, pretrain_seq_len=64)
    base = build_demo_base(CORPUS, cfg, cache_dir=root)
    adapters = {}
    for i in range(ADAPTERS):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(base)
        lora = LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=False,
        )
        get_peft_model(model, lora).save_pretrained(root / f"expert-{i}")
        adapters[f"expert-{i}"] = root / f"expert-{i}"
    return base, adapters


def _trace(n: int, max_new_tokens: int, one_adapter: bool):
    from lorafleet.generation import GenerationRequest

    return [
        GenerationRequest(
            messages=[{"role": "user", "content": f"Request {i}: {CORPUS[i % 5]}"}],
            adapter="expert-0" if one_adapter else f"expert-{i % ADAPTERS}",
            max_new_tokens=max_new_tokens,
        )
        for i in range(n)
    ]


def _summary(name: str, results, latencies: list[float], wall: float) -> dict:
    tokens = sum(r.completion_tokens for r in results)
    ordered = sorted(latencies)
    return {
        "arm": name,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "p50_s": round(statistics.median(ordered), 3),
        "p99_s": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
    }


async def _batched(generator, requests, batch_size: int):
    from lorafleet.serve.batching import MicroBatcher

    batcher = MicroBatcher(generator, batch_size, 0.005, max_queue=len(requests))
    start = time.perf_counter()
    latencies: list[float] = []

    async def one(request):
        result = await batcher.submit(request)
        latencies.append(time.perf_counter() - start)
        return result

    try:
        results = await asyncio.gather(*(one(r) for r in requests))
    finally:
        batcher.close()
    return results, latencies, time.perf_counter() - start


def _naive(generator, requests):
    start = time.perf_counter()
    results, latencies = [], []
    for request in requests:
        results += generator.generate([request])  # batch of one: this request's adapter only
        latencies.append(time.perf_counter() - start)
    return results, latencies, time.perf_counter() - start


def _weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _resident(kind: str, base: str, adapters: dict[str, str]) -> dict:
    """Load one serving setup in this (fresh) process; report weight bytes and RSS."""
    import torch

    torch.set_num_threads(1)
    from lorafleet.generation import Generator

    if kind == "fleet":
        model = Generator(base, adapters).model
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        path = next(iter(adapters.values()))
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)
        model = model.merge_and_unload()
    with open("/proc/self/status") as fh:
        rss_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return {"weight_bytes": _weight_bytes(model), "rss_bytes": rss_kb * 1024}


def _measure_memory(base: Path, adapters: dict[str, Path]) -> dict:
    out = {}
    for kind in ("fleet", "merged"):
        args = json.dumps([kind, str(base), {k: str(v) for k, v in adapters.items()}])
        proc = subprocess.run(
            [sys.executable, __file__, "--resident", args],
            capture_output=True,
            text=True,
            check=True,
        )
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--resident", help=argparse.SUPPRESS)  # internal: one memory probe
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.resident:
        print(json.dumps(_resident(*json.loads(args.resident))))
        return

    import torch

    from lorafleet.generation import Generator

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = _build(Path(tmp))
        generator = Generator(base, adapters)
        generator.generate(_trace(ADAPTERS, 2, one_adapter=False))  # warm-up
        mixed = _trace(args.requests, args.max_new_tokens, one_adapter=False)
        a = asyncio.run(_batched(generator, mixed, args.batch_size))
        b = _naive(generator, mixed)
        c = asyncio.run(
            _batched(generator, _trace(args.requests, args.max_new_tokens, True), args.batch_size)
        )
        if [r.text for r in a[0]] != [r.text for r in b[0]]:
            raise SystemExit("mixed batches and one-at-a-time answers differ")
        memory = _measure_memory(base, adapters)
    arms = {
        "a_mixed_batches": _summary("a", *a),
        "b_one_at_a_time": _summary("b", *b),
        "c_one_adapter": _summary("c", *c),
    }
    report = {
        "trace": {
            "requests": args.requests,
            "adapters": ADAPTERS,
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
            "torch_threads": args.threads,
        },
        "arms": arms,
        "ratios": {
            "a_over_b_tokens_per_s": round(
                arms["a_mixed_batches"]["tokens_per_s"] / arms["b_one_at_a_time"]["tokens_per_s"], 2
            ),
            "a_over_c_tokens_per_s": round(
                arms["a_mixed_batches"]["tokens_per_s"] / arms["c_one_adapter"]["tokens_per_s"], 2
            ),
            "fleet_over_merged_weight_bytes": round(
                memory["fleet"]["weight_bytes"] / memory["merged"]["weight_bytes"], 3
            ),
            "fleet_over_merged_rss": round(
                memory["fleet"]["rss_bytes"] / memory["merged"]["rss_bytes"], 3
            ),
        },
        "memory": memory,
        "load_average_1m": {
            "before": round(load_before[0], 2),
            "after": round(os.getloadavg()[0], 2),
        },
        "cpus": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
