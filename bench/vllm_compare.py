"""The native runtime vs vLLM vs the lorafleet router in front of vLLM, over HTTP.

Run through ``bench/serve_bench.py --vs-vllm`` (see its docstring). Every arm serves the
same base and adapters and gets the same two traces, sent with one streaming HTTP client
(time to first token is the first chunk that carries text):

- ``mixed``: ``--requests`` chat requests arriving as a Poisson process at ``--rate``
  requests/s, plus one burst of ``--burst`` requests in the middle; each asks for a number of
  tokens drawn from 8 to 256 (``ignore_eos``: every request makes exactly that many tokens,
  so the arms do the same work);
- ``uniform``: a burst of ``--requests`` requests at once, 16 tokens each.

Arms, measured one server at a time on the same machine: ``native`` (``python -m
lorafleet.serve.runtime``), ``vllm`` (vLLM's OpenAI server, straight, asked on its Unix
socket) and ``router_vllm`` (lorafleet's vLLM front, :mod:`lorafleet.serve.vllm_front`:
the admission checks, the route table and per-adapter metrics in front of the same vLLM
process as ``vllm``, over the client's TCP connection and the front's socket to vLLM). Each
trace runs ``--rounds`` times per arm (the router and direct vLLM alternate round by round)
and reports its fastest round. The last line is one JSON object with the ratios.

The GPU mode (``--gpu``) runs the native arm on a 1B Llama-shaped base with random weights
(the shape of a 1B model, the demo tokenizer), on CUDA in bf16; vLLM's CUDA build is too
large to carry to a lent device, so its arms run only where ``--vllm-python`` names an
interpreter that has it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
LENGTHS = (8, 16, 32, 64, 128, 256)
PROMPTS = [
    "A client posts a job for a data engineer who knows Python and SQL.",
    "The freelancer writes a short proposal that answers every question in the post.",
    "A good profile lists recent work, rates and the hours the freelancer can give.",
    "The job analyzer reads the post and names the skills, the budget and the deadline.",
    "Candidates are compared on skills, reviews and how well they read the brief.",
]


@dataclass(frozen=True)
class Request:
    """One request of a trace: when it is sent (s after the start), to which adapter, how long."""

    at: float
    adapter: str
    max_tokens: int
    prompt: str


@dataclass(frozen=True)
class Answer:
    ttft: float
    latency: float
    tokens: int
    ok: bool
    error: str | None = None  # a failed request's status and the start of its answer


def mixed_trace(
    n: int, rate: float, burst: int, adapters: Sequence[str], seed: int = 0
) -> list[Request]:
    """``n`` Poisson arrivals at ``rate``/s plus ``burst`` at once halfway; lengths 8-256."""
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        times.append(t)
    times += [times[len(times) // 2]] * burst
    times.sort()
    return [
        Request(at, adapters[i % len(adapters)], rng.choice(LENGTHS), PROMPTS[i % len(PROMPTS)])
        for i, at in enumerate(times)
    ]


def uniform_trace(n: int, adapters: Sequence[str], tokens: int = 16) -> list[Request]:
    """A burst of ``n`` requests at once, ``tokens`` each."""
    return [
        Request(0.0, adapters[i % len(adapters)], tokens, PROMPTS[i % len(PROMPTS)])
        for i in range(n)
    ]


async def _one(client: httpx.AsyncClient, url: str, request: Request, start: float) -> Answer:
    await asyncio.sleep(max(0.0, start + request.at - time.perf_counter()))
    sent = time.perf_counter()
    body = {
        "model": request.adapter,
        "messages": [{"role": "user", "content": request.prompt}],
        "max_tokens": request.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    first, tokens = None, 0
    async with client.stream("POST", f"{url}/chat/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")[:160]
            return Answer(
                0.0, time.perf_counter() - sent, 0, False, f"{response.status_code} {text}"
            )
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if first is None and any(
                (c.get("delta") or {}).get("content") for c in event.get("choices") or ()
            ):
                first = time.perf_counter() - sent
    latency = time.perf_counter() - sent
    return Answer(first if first is not None else latency, latency, tokens, True)


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _run_trace(url: str, trace: Sequence[Request]) -> dict:
    # A fresh connection per request for every arm: vLLM's server leaves Nagle's algorithm on,
    # and a reused connection's streamed events then wait for delayed ACKs (docs/serving.md).
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=0)
    transport = None
    if url.startswith("unix:"):  # vLLM asked on its socket, unix:PATH
        transport = httpx.AsyncHTTPTransport(uds=url.removeprefix("unix:"), limits=limits)
        url = "http://vllm/v1"
    async with httpx.AsyncClient(timeout=600, limits=limits, transport=transport) as client:
        start = time.perf_counter()
        answers = await asyncio.gather(*(_one(client, url, r, start) for r in trace))
        wall = time.perf_counter() - start
    ok = [a for a in answers if a.ok]
    tokens = sum(a.tokens for a in ok)
    return {
        "requests": len(trace),
        "failed": len(answers) - len(ok),
        "errors": sorted({a.error for a in answers if a.error})[:3],
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(statistics.median(a.ttft for a in ok), 3) if ok else None,
        "ttft_p99_s": round(_pct([a.ttft for a in ok], 0.99), 3) if ok else None,
        "latency_p50_s": round(statistics.median(a.latency for a in ok), 3) if ok else None,
        "latency_p99_s": round(_pct([a.latency for a in ok], 0.99), 3) if ok else None,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, process: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited ({process.returncode}); log: {log}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        time.sleep(1)
    raise SystemExit(f"server not ready after {timeout:.0f} s; log: {log}")


@contextlib.contextmanager
def _server(cmd: list[str], ready_url: str, log: Path, env: dict[str, str]) -> Iterator[None]:
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            _wait(ready_url, process, 900, log)
            yield
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _native_cmd(base: Path, adapters: dict[str, Path], port: int, args) -> list[str]:
    cmd = [sys.executable, "-m", "lorafleet.serve.runtime", "--base", str(base)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--max-batch-size", str(args.max_seqs)]
    cmd += ["--max-queue", str(4 * (args.requests + args.burst))]
    if args.gpu:
        cmd += ["--dtype", "bfloat16"]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    return cmd


def _front_cmd(base: Path, adapters: dict[str, Path], port: int, uds: Path, args) -> list:
    cmd = [sys.executable, "-m", "lorafleet.serve.vllm_front", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--vllm-uds", str(uds), "--vllm-python", args.vllm_python]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    cmd += ["--model", str(base), "--served-model-name", "base", "--enable-lora"]
    cmd += ["--max-loras", str(len(adapters)), "--max-lora-rank", str(args.rank)]
    cmd += ["--max-num-seqs", str(args.max_seqs), "--max-model-len", "2048"]
    cmd += ["--dtype", "bfloat16" if args.gpu else "float32"]
    return cmd


def _best(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: r["tokens_per_s"])


def _measure(url: str, traces: dict[str, list[Request]], rounds: int) -> dict[str, list[dict]]:
    asyncio.run(_run_trace(url, uniform_trace(8, sorted({r.adapter for r in traces["mixed"]}))))
    return {
        name: [asyncio.run(_run_trace(url, t)) for _ in range(rounds)] for name, t in traces.items()
    }


def build_gpu_base(root: Path, demo_base: Path) -> Path:
    """A 1B Llama-shaped base with random weights and the demo tokenizer (GPU mode)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(demo_base)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    out = root / "llama-1b-shape"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run(args: argparse.Namespace, base: Path, adapters: dict[str, Path], tmp: Path) -> dict:
    """Measure every arm on ``base`` + ``adapters``; print a line per arm and trace."""
    names = sorted(adapters)
    traces = {
        "mixed": mixed_trace(args.requests, args.rate, args.burst, names),
        "uniform": uniform_trace(args.requests, names),
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, dict[str, dict]] = {}
    port = _free_port()
    with _server(
        _native_cmd(base, adapters, port, args),
        f"http://127.0.0.1:{port}/v2/health/ready",
        tmp / "native.log",
        env,
    ):
        runs = _measure(f"http://127.0.0.1:{port}/openai/v1", traces, args.rounds)
        results["native"] = {name: _best(r) for name, r in runs.items()}
    have_vllm = args.vllm_python and Path(args.vllm_python).exists()
    if have_vllm:
        port, uds = _free_port(), tmp / "vllm.sock"
        vllm_env = {**env, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}
        with _server(
            _front_cmd(base, adapters, port, uds, args),
            f"http://127.0.0.1:{port}/v2/health/ready",
            tmp / "vllm.log",
            vllm_env,
        ):
            direct = f"unix:{uds}"
            routed = f"http://127.0.0.1:{port}/openai/v1"
            asyncio.run(_run_trace(direct, uniform_trace(8, names)))
            both: dict[str, dict[str, list[dict]]] = {"vllm": {}, "router_vllm": {}}
            for _ in range(args.rounds):  # router and direct alternate: same load on both
                for arm, url in (("vllm", direct), ("router_vllm", routed)):
                    for name, trace in traces.items():
                        both[arm].setdefault(name, []).append(asyncio.run(_run_trace(url, trace)))
            for arm, runs in both.items():
                results[arm] = {name: _best(r) for name, r in runs.items()}
    for arm, by_trace in results.items():
        for name, summary in by_trace.items():
            print(json.dumps({"arm": arm, "trace": name, **summary}))

    def ratio(a: str, b: str, trace: str) -> float | None:
        if a not in results or b not in results:
            return None
        return round(results[a][trace]["tokens_per_s"] / results[b][trace]["tokens_per_s"], 3)

    router = [ratio("router_vllm", "vllm", t) for t in traces]
    return {
        "native_over_vllm_mixed": ratio("native", "vllm", "mixed"),
        "native_over_vllm_uniform": ratio("native", "vllm", "uniform"),
        "router_over_direct": None if None in router else round(min(router), 3),
        "native_ttft_p99_over_vllm_mixed": (
            round(
                results["native"]["mixed"]["ttft_p99_s"] / results["vllm"]["mixed"]["ttft_p99_s"], 3
            )
            if "vllm" in results
            else None
        ),
        "requests": args.requests,
        "burst": args.burst,
        "rate": args.rate,
        "rounds": args.rounds,
        "device": "cuda" if args.gpu else "cpu",
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="serve_bench.py --vs-vllm", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--vs-vllm", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--burst", type=int, default=32, help="extra requests at once, mid-trace")
    parser.add_argument(
        "--rate",
        type=float,
        default=24.0,
        help="Poisson arrivals per second (above what the servers sustain here, so the trace "
        "measures capacity, not the arrival rate)",
    )
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-seqs", type=int, default=64, help="the most rows in a batch")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="vLLM's CPU KV cache")
    parser.add_argument("--vllm-python", default=str(VLLM_PYTHON))
    parser.add_argument("--gpu", action="store_true", help="native arm on a 1B Llama shape, CUDA")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from serve_bench import _build

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        base, adapters = _build(tmp)
        if args.gpu:
            base = build_gpu_base(tmp, base)
            adapters = {}  # the demo adapters do not fit the 1B shape
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM

            for i in range(args.adapters):
                model = AutoModelForCausalLM.from_pretrained(base)
                lora = LoraConfig(
                    r=args.rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False
                )
                get_peft_model(model, lora).save_pretrained(tmp / f"gpu-expert-{i}")
                adapters[f"gpu-expert-{i}"] = tmp / f"gpu-expert-{i}"
        adapters = dict(sorted(adapters.items())[: args.adapters])
        print(json.dumps(run(args, base, adapters, tmp)))
