"""Serving eight adapters: the runtime's mixed batches vs one request at a time vs one adapter.

One base (the demo shape of ``examples/fleet.yaml``: 256 hidden, 4 layers), eight random
rank-8 LoRA adapters on q/k/v/o, and one request trace: N chat requests, round-robin over
the adapters, all arriving at once (a burst), greedy, ``--max-new-tokens`` each. The arms
run side by side in this process on the same base weights:

(a) the runtime's :class:`~lorafleet.serve.batching.MicroBatcher` with its default,
    batched LoRA backend (stacked adapters, one pass per LoRA layer): mixed batches;
(a_peft) the same, with PEFT's ``adapter_names`` backend (the per-adapter loop the
    runtime used before; the reference);
(b) naive serving: one request at a time, the adapter switched per request (batch of 1,
    the same generator as (a));
(c) the runtime (batched backend) with the whole trace sent to one adapter.

The arms run in ``--rounds`` interleaved rounds (default 3) and each reports its fastest
round, so load from other processes mostly drops out of the ratios. (a), (a_peft) and (b)
must produce identical text. Latency is measured from the burst to each request's answer;
``--sweep`` reruns arm (a) at other max batch sizes. Memory: bytes of the distinct
storages behind (i) the base with all eight adapters loaded, the stacked LoRA tables
included, and (ii) one merged model (base + one adapter, merged), and the RSS of a fresh
process holding each. Reproduce:

    .venv/bin/python bench/serve_bench.py                 # 128 requests, 16 new tokens
    .venv/bin/python bench/serve_bench.py --batch-size 64
    .venv/bin/python bench/serve_bench.py --threads 1 --sweep 8,16,32,64,128
    .venv/bin/python bench/serve_bench.py --requests 256 --max-new-tokens 32

``--vs-vllm`` measures, over HTTP, the native runtime against vLLM's CPU build and against
lorafleet's front in front of vLLM on one mixed-length Poisson trace and one uniform burst
(:mod:`vllm_compare`; needs ``make vllm-env``). The last line is one JSON object with
``native_over_vllm_mixed``, ``native_over_vllm_uniform`` and ``router_over_direct``:

    make vllm-env && .venv/bin/python bench/serve_bench.py --vs-vllm
    .venv/bin/python bench/serve_bench.py --vs-vllm --gpu     # on a device: 1B shape, CUDA
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
from collections.abc import Callable
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
    from lorafleet.engine.generation import GenerationRequest

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


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``: views of one stack count once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _resident(kind: str, base: str, adapters: dict[str, str]) -> dict:
    """Load one serving setup in this (fresh) process; report weight bytes and RSS."""
    import torch

    torch.set_num_threads(1)
    from lorafleet.engine.generation import Generator

    out = {}
    if kind == "fleet":
        generator = Generator(base, adapters)
        model = generator.model
        tables = [t for x in generator.lora_bank.tables.values() for t in (x.a, x.b, x.scale)]
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        out["lora_table_bytes"] = generator.lora_bank.nbytes
        out["lora_weight_bytes"] = sum(p.numel() * p.element_size() for p in lora)
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        path = next(iter(adapters.values()))
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)
        model = model.merge_and_unload()
        tables = []
    with open("/proc/self/status") as fh:
        rss_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    weights = [*model.parameters(), *model.buffers(), *tables]
    return {"weight_bytes": _storage_bytes(weights), "rss_bytes": rss_kb * 1024, **out}


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
    if "--vs-vllm" in sys.argv[1:]:
        from vllm_compare import main as compare

        compare(sys.argv[1:])
        return
    from lorafleet.serve.batching import MAX_BATCH_SIZE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=MAX_BATCH_SIZE,
        help="the runtime's max batch size (default: the runtime's, %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 because on a small machine shared with other jobs, more "
        "intra-op threads turn outside load into stalls that hit batch-1 decoding hardest "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of all arms; each reports its fastest"
    )
    parser.add_argument(
        "--sweep",
        default="",
        help="also run arm (a) at these max batch sizes, e.g. 8,16,32,64,128",
    )
    parser.add_argument("--resident", help=argparse.SUPPRESS)  # internal: one memory probe
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.resident:
        print(json.dumps(_resident(*json.loads(args.resident))))
        return

    import torch

    from lorafleet.engine.generation import Generator

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = _build(Path(tmp))
        generator = Generator(base, adapters)
        reference = Generator(base, adapters, lora_backend="peft")
        for warm in (generator, reference):
            warm.generate(_trace(ADAPTERS, 2, one_adapter=False))
        mixed = _trace(args.requests, args.max_new_tokens, one_adapter=False)
        single = _trace(args.requests, args.max_new_tokens, one_adapter=True)
        arm_runs: dict[str, Callable[[], tuple]] = {
            "a": lambda: asyncio.run(_batched(generator, mixed, args.batch_size)),
            "a_peft": lambda: asyncio.run(_batched(reference, mixed, args.batch_size)),
            "b": lambda: _naive(generator, mixed),
            "c": lambda: asyncio.run(_batched(generator, single, args.batch_size)),
        }
        # Rounds interleave the arms, so load from elsewhere lands on all of them alike;
        # each arm reports its fastest round.
        rounds = [{arm: run() for arm, run in arm_runs.items()} for _ in range(args.rounds)]
        best = {arm: min((r[arm] for r in rounds), key=lambda run: run[2]) for arm in arm_runs}
        texts = [r.text for r in best["a"][0]]
        for r in rounds:
            if any([x.text for x in r[arm][0]] != texts for arm in ("a", "a_peft", "b")):
                raise SystemExit("batched, PEFT and one-at-a-time answers differ")
        sweep = [
            {
                "batch_size": size,
                **_summary(
                    "a",
                    *min(
                        (asyncio.run(_batched(generator, mixed, size)) for _ in range(args.rounds)),
                        key=lambda run: run[2],
                    ),
                ),
            }
            for size in map(int, filter(None, args.sweep.split(",")))
        ]
        memory = _measure_memory(base, adapters)
    arms = {
        "a_mixed_batches": _summary("a", *best["a"]),
        "a_peft_mixed_batches": _summary("a_peft", *best["a_peft"]),
        "b_one_at_a_time": _summary("b", *best["b"]),
        "c_one_adapter": _summary("c", *best["c"]),
    }
    report = {
        "trace": {
            "requests": args.requests,
            "adapters": ADAPTERS,
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
            "torch_threads": args.threads,
            "rounds": args.rounds,
        },
        "arms": arms,
        "ratios": {
            "a_over_b_tokens_per_s": round(
                arms["a_mixed_batches"]["tokens_per_s"] / arms["b_one_at_a_time"]["tokens_per_s"], 2
            ),
            "a_over_c_tokens_per_s": round(
                arms["a_mixed_batches"]["tokens_per_s"] / arms["c_one_adapter"]["tokens_per_s"], 2
            ),
            "a_over_a_peft_tokens_per_s": round(
                arms["a_mixed_batches"]["tokens_per_s"]
                / arms["a_peft_mixed_batches"]["tokens_per_s"],
                2,
            ),
            "fleet_over_merged_weight_bytes": round(
                memory["fleet"]["weight_bytes"] / memory["merged"]["weight_bytes"], 3
            ),
            "fleet_over_merged_rss": round(
                memory["fleet"]["rss_bytes"] / memory["merged"]["rss_bytes"], 3
            ),
        },
        "memory": memory,
        "sweep_a": sweep,
        "load_average_1m": {
            "before": round(load_before[0], 2),
            "after": round(os.getloadavg()[0], 2),
        },
        "cpus": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
