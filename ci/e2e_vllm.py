"""A vLLM fleet as its rendered deployment runs it, on this machine's CPU (``make e2e-vllm``).

The fleet spec (``serving.runtime: vllm``, ``serving.router: true``, no GPU) is rendered
with :func:`lorafleet.deploy.render.render` for the ``local`` profile, and what the
cluster would run is read from the rendered objects, not written here again:

- the predictor: the ServingRuntime container's command and arguments, then the
  InferenceService's model arguments (KServe appends them), i.e. the lorafleet vLLM front
  (:mod:`lorafleet.serve.vllm_front`) with vLLM's flags and one ``--adapter NAME=PATH``
  per expert, and the container's environment;
- the router: the transformer container's command and arguments, plus the three KServe
  appends (``--model_name``, ``--predictor_host``, ``--http_port``).

Only CPU and loopback substitutions are made, each printed: the mount paths become the
folders the ``local`` profile's hostPath volumes name, ``python3``/``python`` this
interpreter, vLLM's interpreter ``$LORAFLEET_VLLM_PYTHON`` (``make vllm-env``), the
addresses ``127.0.0.1`` with free ports, the admin token's Secret a generated token, the KV
cache ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB; vLLM's CPU build reads it over the rendered
``--kv-cache-memory-bytes``), and ``--dtype float32``. vLLM starts once.

Then, one JSON line per scenario (``"ok"`` true or false, what was seen, ``"seconds"``),
after a ``rendered`` line (the two command lines and every substitution) and a ``start``
line (seconds until the front, so vLLM, was ready):

1. ``openai``: the ``openai`` client through the router: models, a chat, a stream;
2. ``new-version``: two versions of the writer expert loaded as ``writer-v1`` and
   ``writer-v2`` (the names the rollout controller gives them) through the front's
   ``/admin/adapters``, then served through the router, and listed by vLLM itself;
3. ``broken-refused``: adapters broken one way each (pickle weights, rank over
   ``--max-lora-rank``, another base's fingerprint, zero ``lora_B``, a bad tensor shape, a
   changed file) answered 422 with their reason, and absent from vLLM's own ``/v1/models``;
4. the canary drill of tests/rollout/test_e2e_canary.py (its harness, with the front in
   place of the native runtime): ``healthy`` promoted; ``errors-30pct`` and
   ``latency-500ms`` (faults set on the front) rolled back;
5. ``shutdown``: SIGTERM to the front stops vLLM with it.

Exits non-zero if any scenario fails. Run: ``.venv/bin/python ci/e2e_vllm.py``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from lorafleet.base import DemoBaseConfig, build_demo_base, fingerprint_model
from lorafleet.deploy.render import render
from lorafleet.fleet import FleetSpec
from lorafleet.io import sha256_file

ROOT = Path(__file__).resolve().parents[1]

VLLM_PYTHON = Path(os.environ.get("LORAFLEET_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
START_TIMEOUT_S = 420
MAX_LORA_RANK = 8
ANALYSIS_S = 3.0  # the drill's analysis interval (see load_harness)
MAX_P95_MS = 700  # the drill's p95 limit; the latency fault adds 500 ms (see load_harness)
# A small Llama that vLLM's CPU build serves in milliseconds per token: the drill measures
# serving, not the model.
BASE = DemoBaseConfig(
    vocab_size=300,
    hidden_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=128,
    pretrain_steps=30,
    pretrain_seq_len=32,
)
CORPUS = [
    "A client posts a job for a data engineer who knows Python and SQL.",
    "The freelancer writes a short proposal that answers every question in the post.",
    "The job analyzer reads the post and names the skills, the budget and the deadline.",
] * 8
WEIGHTS = "adapter_model.safetensors"
# expert -> versions in the adapter store; the rendered deployment serves v1 of each.
STORE = {"writer": ("v1", "v2"), "analyzer": ("v1",)}


def log(message: str) -> None:
    print(f"[e2e-vllm] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the fleet: a base, an adapter store, the spec, its rendering --------------------------


def make_adapter(base: Path, out: Path, seed: int, rank: int = 4, zero_b: bool = False) -> Path:
    """A PEFT LoRA adapter on ``base``, untrained but with a strong random update (B random
    unless ``zero_b``), with the ``lineage.json`` a registered adapter carries."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=rank,
        lora_alpha=8 * rank,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=zero_b,  # True is PEFT's default: B zero
    )
    get_peft_model(model, config).save_pretrained(out)
    register(out, fingerprint_model(base))
    return out


def register(adapter: Path, base_fingerprint: str) -> None:
    """Write the ``lineage.json`` the registry gives an adapter: its base's fingerprint and
    the SHA-256 of its files."""
    files = {name: sha256_file(adapter / name) for name in ("adapter_config.json", WEIGHTS)}
    lineage = {"base": {"fingerprint": base_fingerprint}, "files": files}
    (adapter / "lineage.json").write_text(json.dumps(lineage, indent=2))


def fleet_spec(store: Path) -> FleetSpec:
    """A fleet of the store's experts served by vLLM (CPU), with the router in front."""
    return FleetSpec.model_validate(
        {
            "name": "e2e-vllm",
            "base": {"model": "demo"},
            "experts": [
                {"name": name, "task": task, "seed_data": "s.jsonl", "eval_data": "e.jsonl"}
                for name, task in (("writer", "proposal-writer"), ("analyzer", "job-analyzer"))
            ],
            "serving": {
                "runtime": "vllm",
                "profile": "local",
                "gpus": 0,
                "router": True,
                "max_lora_rank": MAX_LORA_RANK,
                "max_batch_size": 16,
                "adapter_store": str(store),
            },
            "canary": {"mode": "router"},
        }
    )


def _one(objects: list[dict], kind: str) -> dict:
    [found] = [o for o in objects if o["kind"] == kind]
    return found


def _mounts(predictor: dict) -> dict[str, str]:
    """Mount path -> the local folder of its hostPath volume (the ``local`` profile)."""
    volumes = {v["name"]: v["hostPath"]["path"] for v in predictor["volumes"] if "hostPath" in v}
    return {m["mountPath"]: volumes[m["name"]] for m in predictor["model"]["volumeMounts"]}


def _set_flag(args: list[str], flag: str, value: str) -> None:
    """Set ``flag``'s value in ``args`` (``--flag VALUE`` or ``--flag=VALUE``), or add it."""
    for i, token in enumerate(args):
        if token == flag and i + 1 < len(args):
            args[i + 1] = value
            return
        if token.startswith(f"{flag}="):
            args[i] = f"{flag}={value}"
            return
    args += [flag, value]


def local_commands(objects: list[dict], token: str) -> dict[str, Any]:
    """The predictor's and the router's command lines and environments, from the rendered
    objects, with the CPU and loopback substitutions (listed under ``substitutions``).

    Raises:
        RuntimeError: if the rendering is not the shape this drill reads (the front as the
            ServingRuntime's command, adapters as ``--adapter NAME=PATH``).
    """
    runtime = _one(objects, "ServingRuntime")["spec"]["containers"][0]
    isvc = _one(objects, "InferenceService")
    predictor = isvc["spec"]["predictor"]
    if runtime["command"][1:] != ["-m", "lorafleet.serve.vllm_front"]:
        raise RuntimeError(f"ServingRuntime command {runtime['command']}: not the vLLM front")
    rendered = [*runtime.get("args", []), *predictor["model"].get("args", [])]
    if not any(a == "--adapter" for a in rendered) or "--lora-modules" in rendered:
        raise RuntimeError(f"predictor args {rendered}: expected --adapter NAME=PATH per expert")
    substitutions: list[str] = [f"command {runtime['command'][0]} -> {sys.executable}"]
    args = list(rendered)
    for mount, folder in _mounts(predictor).items():
        pattern = re.compile(re.escape(mount) + r"(?=/|$)")
        args = [pattern.sub(folder, a) for a in args]
        substitutions.append(f"mount {mount} -> {folder}")
    port = free_port()
    # vLLM's socket named, so that the checks below can ask vLLM itself what it loaded.
    uds = str(Path(tempfile.mkdtemp(prefix="e2e-vllm-")) / "vllm.sock")
    _set_flag(args, "--host", "127.0.0.1")
    _set_flag(args, "--port", str(port))
    args += ["--vllm-uds", uds, "--vllm-python", str(VLLM_PYTHON), "--dtype", "float32"]
    substitutions += [
        f"--host 127.0.0.1 --port {port} --vllm-uds {uds}",
        f"--vllm-python {VLLM_PYTHON}",
        "--dtype float32",
        "env VLLM_CPU_KVCACHE_SPACE=1",
        "env LORAFLEET_ADMIN_TOKEN from the Secret: a generated token",
    ]
    env = {e["name"]: e["value"] for e in runtime.get("env", []) if "value" in e}
    env.pop("HOME", None)  # the image's home; this user's here
    substitutions.append("env HOME: this user's")
    env.update({"LORAFLEET_ADMIN_TOKEN": token, "VLLM_CPU_KVCACHE_SPACE": "1"})
    front = {
        "command": [sys.executable, *runtime["command"][1:], *args],
        "env": env,
        "url": f"http://127.0.0.1:{port}",
        "vllm_uds": uds,
    }
    router = None
    transformer = (isvc["spec"].get("transformer") or {}).get("containers")
    if transformer:
        container = transformer[0]
        router_port = free_port()
        router_args = list(container.get("args", []))
        _set_flag(router_args, "--host", "127.0.0.1")
        # What KServe appends to a transformer's arguments.
        router_args += ["--model_name", isvc["metadata"]["name"]]
        router_args += ["--predictor_host", f"127.0.0.1:{port}", "--http_port", str(router_port)]
        router = {
            "command": [sys.executable, *container["command"][1:], *router_args],
            "env": {"LORAFLEET_ADMIN_TOKEN": token},
            "url": f"http://127.0.0.1:{router_port}",
        }
        substitutions.append(f"router: --host 127.0.0.1 --http_port {router_port}")
    return {"front": front, "router": router, "substitutions": substitutions}


# --- processes -----------------------------------------------------------------------------


@contextlib.contextmanager
def running(name: str, command: list[str], env: dict[str, str], url: str, timeout: float):
    """A child process for a ``with`` block, ready once ``url/v2/health/ready`` answers 200;
    its output goes to a temp file, whose end is shown if it fails to come up."""
    with tempfile.NamedTemporaryFile(prefix=f"e2e-vllm-{name}-", suffix=".log") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {process.returncode}: {_tail(out.name)}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not ready after {timeout:.0f} s: {_tail(out.name)}")
                time.sleep(0.5)
            yield process
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _tail(path: str, chars: int = 3000) -> str:
    return Path(path).read_text(errors="replace")[-chars:]


# --- scenarios -----------------------------------------------------------------------------


def admin(url: str, token: str, method: str, path: str, body: dict | None = None):
    headers = {"authorization": f"Bearer {token}"}
    return httpx.request(method, url + path, json=body, headers=headers, timeout=300)


def vllm_get(front: dict, path: str) -> httpx.Response:
    """``GET path`` asked of vLLM itself, on its Unix socket (not through the front)."""
    transport = httpx.HTTPTransport(uds=front["vllm_uds"])
    with httpx.Client(transport=transport, base_url="http://vllm", timeout=10) as client:
        return client.get(path)


def vllm_models(front: dict) -> dict[str, str]:
    """vLLM's own listing: id -> root (the adapter's folder)."""
    return {m["id"]: m["root"] for m in vllm_get(front, "/v1/models").json()["data"]}


def scenario_openai(front: dict, serving: str) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{serving}/openai/v1", api_key="unused", max_retries=0)
    models = sorted(m.id for m in client.models.list())
    messages = [{"role": "user", "content": "Write a short proposal for a Python job."}]
    chat = client.chat.completions.create(model="writer", messages=messages, max_tokens=8)
    stream = client.chat.completions.create(
        model="analyzer", messages=messages, max_tokens=8, stream=True
    )
    chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
    base = client.chat.completions.create(model="base", messages=messages, max_tokens=4)
    line = {
        "models": models,
        "chat": {"model": chat.model, "completion_tokens": chat.usage.completion_tokens},
        "stream_chunks": len(chunks),
        "base_completion_tokens": base.usage.completion_tokens,
    }
    assert {"base", "writer", "analyzer"} <= set(models), models
    assert chat.choices[0].message.content and chat.usage.completion_tokens > 0
    assert len(chunks) > 1 and "".join(chunks)
    return line


def scenario_new_version(front: dict, serving: str, store: Path, token: str) -> dict:
    loaded = {}
    for version in STORE["writer"]:
        source = store / "writer" / version
        response = admin(
            front["url"], token, "PUT", f"/admin/adapters/writer-{version}", {"source": str(source)}
        )
        assert response.status_code == 200, response.text
        loaded[f"writer-{version}"] = response.json()["status"]
    listed = vllm_models(front)
    body = {"model": "writer-v2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    answer = httpx.post(f"{serving}/openai/v1/chat/completions", json=body, timeout=60)
    line = {
        "loaded": loaded,
        "vllm_lists": sorted(listed),
        "served_by": answer.headers.get("x-lorafleet-adapter"),
        "status": answer.status_code,
    }
    assert listed.get("writer-v2") == str((store / "writer" / "v2").resolve()), listed
    assert answer.status_code == 200 and line["served_by"] == "writer-v2", answer.text
    return line


def _broken_adapters(base: Path, good: Path, root: Path) -> dict[str, Path]:
    """Adapters broken one way each: kind -> folder."""
    import torch
    from safetensors.torch import load_file, save_file

    out: dict[str, Path] = {}

    def copy(kind: str) -> Path:
        out[kind] = Path(shutil.copytree(good, root / kind))
        return out[kind]

    path = copy("pickle")
    torch.save(load_file(path / WEIGHTS), path / "adapter_model.bin")
    (path / WEIGHTS).unlink()
    out["rank"] = make_adapter(base, root / "rank", seed=41, rank=2 * MAX_LORA_RANK)
    path = copy("other-base")
    lineage = json.loads((path / "lineage.json").read_text())
    lineage["base"]["fingerprint"] = "0123456789abcdef"
    (path / "lineage.json").write_text(json.dumps(lineage))
    out["zero-b"] = make_adapter(base, root / "zero-b", seed=42, zero_b=True)
    path = copy("shape")
    tensors = load_file(path / WEIGHTS)
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = torch.ones(tensors[key].shape[0], tensors[key].shape[1] + 16)
    save_file(tensors, path / WEIGHTS)
    register(path, fingerprint_model(base))  # registered so: only its shape is wrong
    path = copy("changed-file")  # a byte of the weights changed after registration
    data = bytearray((path / WEIGHTS).read_bytes())
    data[-1] ^= 1
    (path / WEIGHTS).write_bytes(bytes(data))
    return out


EXPECTED_REASONS = {
    "pickle": "format",
    "rank": "rank",
    "other-base": "fingerprint",
    "zero-b": "no_effect",
    "shape": "shape",
    "changed-file": "digest",
}


def scenario_broken(front: dict, base: Path, store: Path, token: str, work: Path) -> dict:
    broken = _broken_adapters(base, store / "writer" / "v1", work / "broken")
    answers = {}
    for kind, path in broken.items():
        response = admin(
            front["url"], token, "PUT", f"/admin/adapters/bad-{kind}", {"source": str(path)}
        )
        answers[kind] = {"status": response.status_code, "code": response.json()["error"]["code"]}
    listed = vllm_models(front)
    line = {"refused": answers, "in_vllm": sorted(n for n in listed if n.startswith("bad-"))}
    for kind, answer in answers.items():
        assert answer == {"status": 422, "code": EXPECTED_REASONS[kind]}, (kind, answer)
    assert line["in_vllm"] == [], line
    return line


def load_harness() -> Any:
    """tests/rollout/test_e2e_canary.py, whose drill (``_drill``) and policy this reuses,
    with analyses of ``ANALYSIS_S`` seconds instead of 1 and a p95 limit of ``MAX_P95_MS``
    instead of 450 ms (its ``POLICY``, which ``_drill`` reads, replaced; every other
    setting stays).

    Why: on a 2-core machine shared by vLLM's engine, the front, the router and the load
    generator, 1-5 % of requests wait 0.3-1.5 s for a core (measured: p50 ~40 ms, the same
    for every adapter, at any time in a run, so no warm-up). At 20 % of the load a 1 s
    window holds ~10 canary requests, so its p95 is its slowest one; 3 s hold ~30. The p95
    is read from histogram buckets (0.25, 0.5, 1 s): every request 500 ms late puts it
    near 975 ms, while a healthy canary with a few percent of slow requests stays under
    700 ms, and under 450 ms only when the machine is quiet.
    """
    from lorafleet.fleet import CanaryPolicy

    path = ROOT / "tests" / "rollout" / "test_e2e_canary.py"
    spec = importlib.util.spec_from_file_location("lorafleet_e2e_canary_harness", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    policy = module.POLICY.model_dump()
    policy["analysis"].update(interval_seconds=ANALYSIS_S, min_requests=10)
    policy["max_p95_latency_ms"] = MAX_P95_MS
    module.POLICY = CanaryPolicy.model_validate(policy)
    return module


def scenario_drill(harness: Any, front: dict, serving: str, name: str, fault: dict | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        stack = {"runtime": front["url"], "router": serving}
        with contextlib.redirect_stdout(io.StringIO()):  # its own print: this prints one line
            line = harness._drill(stack, Path(tmp), name, fault)
    if fault is None:
        assert line["outcome"] == "Promoted" and line["route_after"] == {harness.CANARY: 100}, line
    else:
        assert line["outcome"] == "RolledBack", line
        assert line["route_after"] == {harness.STABLE: 100}, line
        assert line["analyses"] <= 2, line
        reason = "error rate" if "error_rate" in fault else "p95"
        assert any(r.startswith(reason) for r in line["decision"]["reasons"]), line
    return line


def scenario_shutdown(process: subprocess.Popen, front: dict) -> dict:
    process.send_signal(signal.SIGTERM)
    code = process.wait(90)
    try:
        vllm_get(front, "/health")
        vllm_gone = False
    except httpx.TransportError:
        vllm_gone = True
    line = {"front_exit_code": code, "vllm_gone": vllm_gone}
    assert code == 0 and vllm_gone, line
    return line


class Scenarios:
    """Runs scenarios, printing one JSON line each; remembers whether any failed."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def run(self, name: str, call: Callable[[], dict]) -> bool:
        """Run one scenario and print its line; whether it passed."""
        start = time.monotonic()
        try:
            line = {"scenario": name, "ok": True, **call()}
        except Exception as exc:  # a failed scenario is reported, and the others still run
            self.failed.append(name)
            detail = "".join(traceback.format_exception_only(exc)).strip()
            line = {"scenario": name, "ok": False, "error": detail[:2000]}
        line["seconds"] = round(time.monotonic() - start, 1)
        print(json.dumps(line), flush=True)
        return line["ok"]


def build_fleet(work: Path, token: str) -> tuple[Path, Path, dict[str, Any]]:
    """The base, the adapter store, and the local commands of the rendered deployment
    (printed as the ``rendered`` line)."""
    log("building the base and the adapter store")
    base = build_demo_base(CORPUS, BASE, cache_dir=work / "cache")
    store = work / "store"
    for seed, (expert, versions) in enumerate(STORE.items()):
        for i, version in enumerate(versions):
            make_adapter(base, store / expert / version, seed=10 * seed + i)
    objects = render(fleet_spec(store), "local", {e: "v1" for e in STORE}, str(base))
    plan = local_commands(objects, token)
    front, router = plan["front"], plan["router"]
    return (
        base,
        store,
        {
            "front_command": front["command"][1:],
            "router_command": router["command"][1:] if router else None,
            "substitutions": plan["substitutions"],
            "plan": plan,
        },
    )


def run_scenarios(scenarios: Scenarios, work: Path, token: str) -> None:
    """Every scenario, on one front (one vLLM start) and the router."""
    rendered: dict[str, Any] = {}

    def render_step() -> dict:
        base, store, line = build_fleet(work, token)
        rendered.update(base=base, store=store, plan=line.pop("plan"))
        return line

    if not scenarios.run("rendered", render_step):
        return
    base, store, plan = rendered["base"], rendered["store"], rendered["plan"]
    front, router = plan["front"], plan["router"]
    log("starting the front (and vLLM behind it)")
    with contextlib.ExitStack() as stack:
        since = time.monotonic()
        up = {}

        def start() -> dict:
            up["front"] = stack.enter_context(
                running("front", front["command"], front["env"], front["url"], START_TIMEOUT_S)
            )
            ready_s = round(time.monotonic() - since, 1)
            if router:
                stack.enter_context(
                    running("router", router["command"], router["env"], router["url"], 60)
                )
            return {"front_ready_s": ready_s, "router": bool(router)}

        if not scenarios.run("start", start):
            return
        serving = router["url"] if router else front["url"]
        scenarios.run("openai", lambda: scenario_openai(front, serving))
        scenarios.run("new-version", lambda: scenario_new_version(front, serving, store, token))
        scenarios.run("broken-refused", lambda: scenario_broken(front, base, store, token, work))
        harness = load_harness()
        for name, fault in (
            ("healthy", None),
            ("errors-30pct", {"error_rate": 0.3}),
            ("latency-500ms", {"added_latency_ms": 500}),
        ):
            scenarios.run(
                name, lambda n=name, f=fault: scenario_drill(harness, front, serving, n, f)
            )
        scenarios.run("shutdown", lambda: scenario_shutdown(up["front"], front))


def main() -> int:
    if not VLLM_PYTHON.exists():
        log(f"no vLLM at {VLLM_PYTHON}: make vllm-env, or set LORAFLEET_VLLM_PYTHON")
        return 2
    started = time.monotonic()
    scenarios = Scenarios()
    token = secrets.token_hex(16)
    os.environ["LORAFLEET_ADMIN_TOKEN"] = token  # the drill harness's admin calls read it
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="e2e-vllm-") as tmp:
        run_scenarios(scenarios, Path(tmp), token)
    summary = {"scenario": "summary", "ok": not scenarios.failed, "failed": scenarios.failed}
    print(json.dumps({**summary, "seconds": round(time.monotonic() - started, 1)}), flush=True)
    return 1 if scenarios.failed else 0


if __name__ == "__main__":
    sys.exit(main())
