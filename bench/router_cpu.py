"""The router's own CPU: per streamed token and per request, over TCP and over a Unix socket.

The router (:func:`lorafleet.serve.proxy.proxy_app`, what the vLLM front serves) runs in its
own process under uvicorn, in front of a stand-in upstream that streams chat completions
like vLLM (one server-sent event per token, 10 ms apart, HTTP/1.1 chunked, keep-alive) and
costs next to nothing itself. The client sends the traces of ``bench/vllm_compare.py``
(``mixed``: Poisson arrivals plus a burst, 8-256 tokens; ``uniform``: 128 requests at once,
16 tokens) and a burst of 1-token requests, and the router's CPU time is read from
``/proc`` around each. Two arms, side by side in one run: the upstream on TCP (the
standalone router's way to a predictor) and on a Unix socket (the vLLM front's way to
vLLM); each trace runs ``--rounds`` times per arm, alternating, and each reports its
cheapest round. The last line is one JSON object.

Reproduce::

    .venv/bin/python bench/router_cpu.py
    git worktree add /tmp/lorafleet-before 5a13bc4     # the router on httpx
    .venv/bin/python bench/router_cpu.py --baseline-src /tmp/lorafleet-before

The router's CPU is what it takes from the engine on a machine whose cores are all busy
(this 2-core one); on a GPU node the router has cores of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import vllm_compare as vc

_EVENT = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": " w"}}]}


def _chunk(text: str) -> bytes:
    data = text.encode()
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer the requests of one connection, keep-alive, until the client closes it."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET "):  # the router's readiness probe: the model list
                listing = b'{"object": "list", "data": []}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
                writer.write(b"content-length: %d\r\n\r\n%s" % (len(listing), listing))
                continue
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            body = json.loads(await reader.readexactly(length))
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            tokens = int(body.get("max_tokens", 16))
            for _ in range(tokens):
                await asyncio.sleep(0.01)
                writer.write(_chunk(f"data: {json.dumps(_EVENT)}\n\n"))
                await writer.drain()
            usage = {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": tokens + 5}
            last = _chunk(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n")
            writer.write(last + _chunk("data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _upstream(address: str) -> None:
    if address.startswith("unix:"):
        server = await asyncio.start_unix_server(_serve_one, address[5:], backlog=2048)
    else:
        server = await asyncio.start_server(_serve_one, "127.0.0.1", int(address), backlog=2048)
    async with server:
        await server.serve_forever()


def _router(address: str, port: int) -> None:
    import uvicorn

    from lorafleet.serve.faults import FaultTable
    from lorafleet.serve.proxy import proxy_app
    from lorafleet.serve.routes import RouteTable

    where: dict = {}
    if address.startswith("unix:"):
        where = {"upstream_uds": address[5:]}
        url = "http://vllm"
    else:
        url = f"http://127.0.0.1:{address}"
    app = proxy_app(url, RouteTable(), upstream_prefix="/v1", faults=FaultTable(), **where)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Arm:
    """A stand-in upstream and a router in front of it, each its own process."""

    def __init__(self, name: str, tmp: Path, source: str | None = None) -> None:
        self.name = name
        address = f"unix:{tmp / (name + '.sock')}" if name == "uds" else str(vc._free_port())
        self.port = vc._free_port()
        me = [sys.executable, __file__]
        env = {**os.environ, "PYTHONPATH": source} if source else None  # another revision
        self.upstream = subprocess.Popen([*me, "--upstream", address])
        cmd = [*me, "--router", address, "--port", str(self.port)]
        self.router = subprocess.Popen(cmd, env=env)
        try:
            vc._wait(f"http://127.0.0.1:{self.port}/v2/health/ready", self.router, 60, tmp)
        except BaseException:
            self.stop()
            raise

    def measure(self, trace: list[vc.Request]) -> dict:
        before = _cpu_s(self.router.pid)
        run = asyncio.run(vc._run_trace(f"http://127.0.0.1:{self.port}/openai/v1", trace))
        cpu = _cpu_s(self.router.pid) - before
        if run["failed"]:
            raise SystemExit(f"{self.name}: {run['failed']} requests failed: {run['errors']}")
        return {
            "router_cpu_s": round(cpu, 3),
            "us_per_token": round(1e6 * cpu / run["tokens"], 1),
            "ms_per_request": round(1e3 * cpu / run["requests"], 3),
        }

    def stop(self) -> None:
        for process in (self.router, self.upstream):
            process.send_signal(signal.SIGINT)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default="tcp,uds", help="tcp, uds or both (comma-separated)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--baseline-src",
        metavar="DIR",
        help="a checkout of another lorafleet revision: adds the arm 'baseline', its router "
        "over TCP (e.g. git worktree add /tmp/base HEAD~1)",
    )
    parser.add_argument("--upstream", help=argparse.SUPPRESS)  # internal: the stand-in
    parser.add_argument("--router", help=argparse.SUPPRESS)  # internal: the router
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        asyncio.run(_upstream(args.upstream))
        return
    if args.router:
        _router(args.router, args.port)
        return
    names = ["a", "b", "c"]
    traces = {
        "mixed": vc.mixed_trace(128, 24.0, 32, names),
        "uniform": vc.uniform_trace(128, names),
        "one_token": vc.uniform_trace(256, names, tokens=1),
    }
    with tempfile.TemporaryDirectory() as tmp_dir:
        arms = [_Arm(name, Path(tmp_dir)) for name in args.arms.split(",")]
        if args.baseline_src:
            arms.append(_Arm("baseline", Path(tmp_dir), args.baseline_src))
        try:
            for arm in arms:  # warm-up: imports, first connections
                arm.measure(vc.uniform_trace(8, names))
            runs: dict[str, dict[str, list[dict]]] = {a.name: {} for a in arms}
            for _ in range(args.rounds):
                for arm in arms:
                    for name, trace in traces.items():
                        runs[arm.name].setdefault(name, []).append(arm.measure(trace))
        finally:
            for arm in arms:
                arm.stop()
    best = {
        arm: {name: min(r, key=lambda x: x["router_cpu_s"]) for name, r in by_trace.items()}
        for arm, by_trace in runs.items()
    }
    for arm, by_trace in best.items():
        for name, summary in by_trace.items():
            print(json.dumps({"arm": arm, "trace": name, **summary}))
    result: dict = {
        f"{arm}_{key}": by_trace[trace][key]
        for arm, by_trace in best.items()
        for trace, key in (("mixed", "us_per_token"), ("one_token", "ms_per_request"))
    }
    if {"tcp", "uds"} <= best.keys():
        result["uds_over_tcp_cpu_mixed"] = round(
            best["uds"]["mixed"]["router_cpu_s"] / best["tcp"]["mixed"]["router_cpu_s"], 3
        )
    if {"tcp", "baseline"} <= best.keys():
        result["tcp_over_baseline_cpu_mixed"] = round(
            best["tcp"]["mixed"]["router_cpu_s"] / best["baseline"]["mixed"]["router_cpu_s"], 3
        )
    result["rounds"] = args.rounds
    print(json.dumps(result))


if __name__ == "__main__":
    main()
