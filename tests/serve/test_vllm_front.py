"""The vLLM front: its command line, its admission checks, and a real vLLM behind it.

The unit tests need no vLLM: :func:`split_args` and the other command-line functions,
the base read from its config alone, every admission check on a real adapter broken one
way, and the front's process behaviour with a stand-in interpreter (a start-up adapter that
fails a check stops the front before vLLM starts; a vLLM that dies stops the front).

The ``vllm`` tests start the front once for the module, with the real vLLM CPU build
(``make vllm-env``; ``$LORAFLEET_VLLM_PYTHON`` or ``.venv-vllm``) on the tiny base, and
talk to it with the ``openai`` client and plain HTTP; they skip where vLLM is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lorafleet.base import fingerprint_model
from lorafleet.errors import LorafleetError
from lorafleet.serve.adapters import (
    AdapterRejected,
    BaseModelInfo,
    check_weights_change_something,
)
from lorafleet.serve.runtime import _free_port
from lorafleet.serve.vllm_front import (
    VLLM_DEFAULT_MAX_LORA_RANK,
    admit,
    parse_command_line,
    split_args,
    vllm_command,
    vllm_socket_path,
)

from .conftest import make_adapter

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("LORAFLEET_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
TOKEN = "vllm-front-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MAX_RANK = 8  # the tiny adapters have ranks 4 and 8; a rank-16 adapter is over it

needs_vllm = [
    pytest.mark.vllm,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        not VLLM_PYTHON.exists(),
        reason=f"no vLLM at {VLLM_PYTHON} (make vllm-env, or set LORAFLEET_VLLM_PYTHON)",
    ),
]


# --- the command line ----------------------------------------------------------------------


def test_split_args_takes_front_flags_anywhere_and_keeps_vllm_args_verbatim() -> None:
    argv = [
        "--host",
        "127.0.0.1",
        "--model",
        "/mnt/models/base",
        "--adapter",
        "writer=/mnt/models/adapters/writer/v3",
        "--max-lora-rank=16",
        "--port=9000",
        "--served-model-name",
        "base",
        "--require-lineage",
        "--dtype",
        "float32",
        "--adapter=analyzer=s3://bucket/analyzer/v1",
        "--vllm-uds",
        "/run/lorafleet/vllm.sock",
    ]
    front, vllm = split_args(argv)
    assert (front.host, front.port) == ("127.0.0.1", 9000)
    assert front.vllm_uds == "/run/lorafleet/vllm.sock"
    assert front.adapter == [
        "writer=/mnt/models/adapters/writer/v3",
        "analyzer=s3://bucket/analyzer/v1",
    ]
    assert front.require_lineage is True
    assert vllm == [
        "--model",
        "/mnt/models/base",
        "--max-lora-rank=16",
        "--served-model-name",
        "base",
        "--dtype",
        "float32",
    ]


def test_split_args_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAFLEET_VLLM_PYTHON", raising=False)
    front, vllm = split_args(["--model", "/b"])
    assert (front.host, front.port, front.vllm_uds) == ("0.0.0.0", 8080, None)
    assert front.vllm_python == sys.executable and front.adapter == [] and vllm == ["--model", "/b"]
    monkeypatch.setenv("LORAFLEET_VLLM_PYTHON", "/opt/vllm/bin/python")
    assert split_args([])[0].vllm_python == "/opt/vllm/bin/python"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--lora-modules", "w=/a"], "--lora-modules: not accepted"),
        (["--lora_modules=w=/a"], "--lora_modules: not accepted"),
        (["--uds", "/tmp/s"], "--uds: not accepted: the front chooses vLLM's socket"),
        (["--adapter", "no-equals-sign"], "expected NAME=SOURCE"),
        (["--adapter"], "--adapter: expects a value"),
        (["--port", "http"], "--port: invalid int value"),
    ],
)
def test_split_args_refuses_in_one_line(argv: list[str], says: str) -> None:
    with pytest.raises(LorafleetError) as err:
        split_args(argv)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_the_command_line_names_base_rank_and_served_name() -> None:
    config = parse_command_line(
        ["--model", "/m/base", "--max_lora_rank", "32", "--served-model-name", "base", "x"]
    )
    assert (config.base_dir, config.max_rank, config.served_name) == (Path("/m/base"), 32, "base")
    config = parse_command_line(["--model=/m/base"])
    assert (config.max_rank, config.served_name) == (VLLM_DEFAULT_MAX_LORA_RANK, "/m/base")
    with pytest.raises(LorafleetError, match="--model: vLLM's base model directory is required"):
        parse_command_line(["--adapter", "a=/x"])
    with pytest.raises(LorafleetError, match="--adapter base: is the base model's served name"):
        parse_command_line(["--model", "/b", "--served-model-name", "base", "--adapter", "base=/x"])


def test_vllm_listens_only_on_a_unix_socket_with_lora_enabled() -> None:
    config = parse_command_line(
        [
            *("--host", "0.0.0.0", "--port", "8080"),
            *("--vllm-python", "py", "--model", "/b", "--max-loras", "4"),
        ]
    )
    command = vllm_command(config, "/run/v.sock")
    assert command[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    assert command[3:] == [
        *("--model", "/b", "--max-loras", "4", "--enable-lora"),
        *("--uds", "/run/v.sock"),
    ]
    given = parse_command_line(["--model", "/b", "--enable_lora"])
    command = vllm_command(given, "/run/v.sock")
    assert "--enable_lora" in command and "--enable-lora" not in command  # given once


def test_the_vllm_socket_path(tmp_path: Path) -> None:
    private = tmp_path / "private"
    assert vllm_socket_path(None, private) == str(private / "vllm.sock")
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(stale))  # an earlier run's socket, left behind: vLLM cannot bind it
    assert vllm_socket_path(str(stale), private) == str(stale) and not stale.exists()
    (tmp_path / "file").write_text("x")
    refusals = {
        str(tmp_path / "file"): "exists and is not a socket",
        str(tmp_path / "no" / "v.sock"): f"directory {tmp_path / 'no'} does not exist",
        "/" + "x" * 120: "longer than a Unix socket path may be (107 bytes)",
    }
    for given, says in refusals.items():
        with pytest.raises(LorafleetError) as err:
            vllm_socket_path(given, private)
        assert str(err.value) == f"--vllm-uds {given}: {says}"
    assert (tmp_path / "file").read_text() == "x"


# --- admission -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_info(tiny_base: Path) -> BaseModelInfo:
    return BaseModelInfo.from_directory(tiny_base)


def test_the_base_read_from_its_config_equals_the_loaded_model(
    tiny_base: Path, base_info: BaseModelInfo
) -> None:
    from transformers import AutoModelForCausalLM

    loaded = BaseModelInfo.from_model(
        AutoModelForCausalLM.from_pretrained(tiny_base), fingerprint_model(tiny_base)
    )
    assert base_info.linear_shapes and base_info.param_shapes  # shapes were read at all
    assert base_info == loaded


def test_a_directory_without_a_config_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(LorafleetError, match="not a base model directory"):
        BaseModelInfo.from_directory(tmp_path)


def _broken(kind: str, base: Path, good: Path, out: Path) -> Path:
    """A copy of ``good`` broken one way (``kind``), or a new adapter made broken."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    if kind == "zero_b":  # PEFT's default init: B is zero until trained
        return make_adapter(base, out, seed=7, init_random=False)
    if kind == "rank":
        return make_adapter(base, out, seed=7, rank=2 * MAX_RANK)
    path = Path(shutil.copytree(good, out))
    weights = path / "adapter_model.safetensors"
    if kind == "pickle":
        torch.save(load_file(weights), path / "adapter_model.bin")
        weights.unlink()
    elif kind == "fingerprint":
        lineage = {"base": {"model": "other", "fingerprint": "0123456789abcdef"}}
        (path / "lineage.json").write_text(json.dumps(lineage))
    elif kind == "shape":
        tensors = load_file(weights)
        key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
        rank, width = tensors[key].shape
        tensors[key] = torch.ones(rank, width + 16)  # made for a wider base
        save_file(tensors, weights)
    return path


def _biased(base: Path, out: Path) -> Path:
    """An adapter with a LoRA bias: it passes every admission check, and vLLM has no LoRA
    bias, so vLLM refuses it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    config = LoraConfig(
        r=4, lora_alpha=32, target_modules=["q_proj"], lora_bias=True, init_lora_weights=False
    )
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(out)
    return out


BROKEN = {
    "pickle": "format",
    "rank": "rank",
    "fingerprint": "fingerprint",
    "zero_b": "no_effect",
    "shape": "shape",
}


@pytest.mark.parametrize(("kind", "reason"), BROKEN.items())
def test_admission_refuses_each_kind_of_broken_adapter(
    kind: str,
    reason: str,
    tiny_base: Path,
    tiny_adapters: dict[str, Path],
    base_info: BaseModelInfo,
    tmp_path: Path,
) -> None:
    path = _broken(kind, tiny_base, tiny_adapters["proposal-writer"], tmp_path / kind)
    with pytest.raises(AdapterRejected) as err:
        admit("candidate", path, base_info, MAX_RANK, base_name="base", cache_dir=tmp_path)
    assert err.value.reason == reason
    assert "\n" not in str(err.value)


def test_admission_passes_a_good_adapter_and_refuses_the_base_name(
    tiny_adapters: dict[str, Path], base_info: BaseModelInfo, tmp_path: Path
) -> None:
    good = tiny_adapters["job-analyzer"]
    info = admit("writer", good, base_info, MAX_RANK, base_name="base", cache_dir=tmp_path)
    assert (info.name, info.path, info.rank) == ("writer", good, 8)
    with pytest.raises(AdapterRejected) as err:
        admit("base", good, base_info, MAX_RANK, base_name="base", cache_dir=tmp_path)
    assert err.value.reason == "name"


def test_an_update_is_zero_when_either_factor_or_alpha_is(
    tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    path = Path(shutil.copytree(tiny_adapters["proposal-writer"], tmp_path / "a"))
    check_weights_change_something("a", path)  # the random adapter changes something
    # Given lora_A zeroed everywhere (B still random): B @ A is zero
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    assert any(".lora_A." in k for k in tensors)
    save_file(
        {k: torch.zeros_like(t) if ".lora_A." in k else t for k, t in tensors.items()}, weights
    )
    with pytest.raises(AdapterRejected) as err:
        check_weights_change_something("a", path)
    assert err.value.reason == "no_effect"
    # Given the weights restored but lora_alpha 0: the update is scaled to zero
    save_file(tensors, weights)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 0}))
    with pytest.raises(AdapterRejected, match="lora_alpha is 0"):
        check_weights_change_something("a", path)


# --- the front's process, with a stand-in interpreter --------------------------------------


def _stand_in(tmp_path: Path, exit_code: int) -> tuple[Path, Path]:
    """An executable that records it ran, then exits: it stands where vLLM's Python goes."""
    marker = tmp_path / "vllm-started"
    script = tmp_path / "python"
    script.write_text(f'#!/bin/sh\necho "$@" > {marker}\nexit {exit_code}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, marker


def _front_cmd(python: Path, base: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lorafleet.serve.vllm_front",
        *("--host", "127.0.0.1", "--port", str(_free_port())),
        *("--vllm-python", str(python), "--model", str(base), "--max-lora-rank", str(MAX_RANK)),
        *args,
    ]


@pytest.mark.integration
def test_a_broken_startup_adapter_stops_the_front_before_vllm_starts(
    tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    python, marker = _stand_in(tmp_path, 0)
    broken = _broken("zero_b", tiny_base, tiny_adapters["proposal-writer"], tmp_path / "zero")
    good = tiny_adapters["proposal-writer"]
    cmd = _front_cmd(python, tiny_base, "--adapter", f"good={good}", "--adapter", f"bad={broken}")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: adapter 'bad' rejected (no_effect): {broken / 'adapter_model.safetensors'}: "
        "every module's lora_B (or lora_A) is all zeros: the adapter does not change the "
        "base's output (saved before training?)"
    ]
    assert not marker.exists(), "vLLM was started"


@pytest.mark.integration
def test_the_front_exits_non_zero_when_vllm_dies(
    tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    python, marker = _stand_in(tmp_path, 3)
    cmd = _front_cmd(python, tiny_base, "--adapter", f"w={tiny_adapters['proposal-writer']}")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert marker.read_text().split()[:2] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "error: vLLM exited with code 3 before it was healthy"
    )


# --- a real vLLM behind the front ----------------------------------------------------------


def _wait_ready(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the front exited with {process.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the front was not ready after {timeout:.0f} s")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def front(tiny_base: Path, tiny_adapters: dict[str, Path]) -> Iterator[dict]:
    """The front with a real vLLM on the tiny base, serving ``writer`` (started once: vLLM
    takes a minute or two to come up on a small CPU)."""
    port, sock_dir = _free_port(), tempfile.mkdtemp(prefix="vllm-front-test-")
    uds = f"{sock_dir}/vllm.sock"
    cmd = [
        sys.executable,
        "-m",
        "lorafleet.serve.vllm_front",
        *("--host", "127.0.0.1", "--port", str(port), "--vllm-uds", uds),
        *("--vllm-python", str(VLLM_PYTHON)),
        *("--adapter", f"writer={tiny_adapters['proposal-writer']}"),
        *("--model", str(tiny_base), "--served-model-name", "base"),
        *("--max-lora-rank", str(MAX_RANK), "--max-loras", "2", "--max-model-len", "512"),
        *("--dtype", "float32"),
    ]
    env = {**os.environ, "LORAFLEET_ADMIN_TOKEN": TOKEN, "VLLM_CPU_KVCACHE_SPACE": "1"}
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            try:
                _wait_ready(url, process, timeout=400)
            except (TimeoutError, RuntimeError) as exc:
                log.seek(0)
                exc.add_note("front log (end):\n" + log.read()[-4000:].decode(errors="replace"))
                raise
            # vLLM asked directly (not through the front), over its socket.
            vllm = httpx.Client(transport=httpx.HTTPTransport(uds=uds), base_url="http://vllm")
            with vllm:
                yield {"url": url, "vllm": vllm, "uds": uds, "process": process}
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            shutil.rmtree(sock_dir, ignore_errors=True)


def _vllm_models(front: dict) -> dict[str, str]:
    """vLLM's own listing, asked directly (not through the front): id -> root (its path)."""
    listing = front["vllm"].get("/v1/models", timeout=10).json()["data"]
    return {m["id"]: m["root"] for m in listing}


def _put_adapter(front: dict, name: str, source: Path) -> httpx.Response:
    return httpx.put(
        f"{front['url']}/admin/adapters/{name}",
        json={"source": str(source)},
        headers=AUTH,
        timeout=300,
    )


def _chat(front: dict, model: str, **kw) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Write a proposal."}]}
    return httpx.post(
        f"{front['url']}/openai/v1/chat/completions",
        json={**body, "max_tokens": 4, **kw},
        timeout=120,
    )


class TestWithVllm:
    """The front with a real vLLM behind it (one start for the class's module)."""

    pytestmark = needs_vllm

    def test_live_and_ready_once_the_startup_adapter_is_loaded(self, front: dict) -> None:
        assert httpx.get(f"{front['url']}/v2/health/live").json() == {"live": True}
        assert httpx.get(f"{front['url']}/v2/health/ready").json() == {"ready": True}
        assert set(_vllm_models(front)) == {"base", "writer"}

    def test_the_openai_client_lists_chats_and_streams(self, front: dict) -> None:
        from openai import OpenAI

        client = OpenAI(base_url=f"{front['url']}/openai/v1", api_key="unused", max_retries=0)
        assert {"base", "writer"} <= {m.id for m in client.models.list()}
        messages = [{"role": "user", "content": "Write a short proposal."}]
        chat = client.chat.completions.create(model="writer", messages=messages, max_tokens=6)
        assert chat.model == "writer" and chat.usage.completion_tokens > 0
        assert chat.choices[0].message.content
        stream = client.chat.completions.create(
            model="writer", messages=messages, max_tokens=6, stream=True
        )
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert len(pieces) > 1 and "".join(pieces)

    @pytest.mark.parametrize(("kind", "reason"), BROKEN.items())
    def test_a_broken_adapter_is_refused_before_vllm_sees_it(
        self,
        front: dict,
        kind: str,
        reason: str,
        tiny_base: Path,
        tiny_adapters: dict[str, Path],
        tmp_path: Path,
    ) -> None:
        path = _broken(kind, tiny_base, tiny_adapters["proposal-writer"], tmp_path / kind)
        response = _put_adapter(front, f"broken-{kind.replace('_', '-')}", path)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == reason
        # vLLM's own listing, and the front's, never had it
        assert f"broken-{kind.replace('_', '-')}" not in _vllm_models(front)
        listed = httpx.get(f"{front['url']}/admin/adapters", headers=AUTH).json()["adapters"]
        assert {a["name"] for a in listed} >= {"writer"}
        assert not any(a["name"].startswith("broken") for a in listed)

    def test_a_new_version_replaces_the_served_one_and_a_bad_one_does_not(
        self, front: dict, tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path: Path
    ) -> None:
        new = tiny_adapters["job-analyzer"]
        response = _put_adapter(front, "writer", new)
        assert response.status_code == 200, response.text
        assert response.json() == {
            "name": "writer",
            "path": str(new),
            "rank": 8,
            "status": "serving",
        }
        assert _vllm_models(front)["writer"] == str(new.resolve())
        assert _chat(front, "writer").status_code == 200
        # When a broken version is offered for the same name, Then the served one stays:
        # refused by the checks, or by vLLM itself (it has no LoRA bias; the checks pass it)
        broken = _broken("zero_b", tiny_base, new, tmp_path / "zero")
        assert _put_adapter(front, "writer", broken).status_code == 422
        refused = _put_adapter(front, "writer", _biased(tiny_base, tmp_path / "biased"))
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "load"
        assert "vLLM refused it" in refused.json()["error"]["message"]
        assert _vllm_models(front)["writer"] == str(new.resolve())
        served = httpx.get(f"{front['url']}/admin/adapters/writer", headers=AUTH).json()
        assert served["path"] == str(new)
        assert _chat(front, "writer").status_code == 200

    def test_routes_faults_and_metrics_per_adapter(
        self, front: dict, tiny_adapters: dict[str, Path]
    ) -> None:
        url = front["url"]
        assert _put_adapter(front, "writer-v2", tiny_adapters["proposal-writer"]).status_code == 200
        route = {
            "targets": [{"adapter": "writer", "weight": 0}, {"adapter": "writer-v2", "weight": 1}]
        }
        assert httpx.put(f"{url}/admin/routes/w", json=route, headers=AUTH).status_code == 200
        unknown = {"targets": [{"adapter": "nope", "weight": 1}]}
        assert httpx.put(f"{url}/admin/routes/x", json=unknown, headers=AUTH).status_code == 422
        answer = _chat(front, "w")
        assert answer.status_code == 200 and answer.headers["x-lorafleet-adapter"] == "writer-v2"
        # Given a 5xx fault on the canary only, When it is asked, Then the fault answers
        fault = {"error_rate": 1.0}
        assert (
            httpx.put(f"{url}/admin/faults/writer-v2", json=fault, headers=AUTH).status_code == 200
        )
        failed = _chat(front, "w")
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "injected_fault"
        assert _chat(front, "writer").status_code == 200  # the stable version is untouched
        assert httpx.delete(f"{url}/admin/faults/writer-v2", headers=AUTH).status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert 'lorafleet_requests_total{adapter="writer-v2",model="w",status="200"} 1.0' in metrics
        assert 'lorafleet_requests_total{adapter="writer-v2",model="w",status="500"} 1.0' in metrics
        # A routed adapter cannot be unloaded; once the route is gone it can, from vLLM too
        assert httpx.delete(f"{url}/admin/adapters/writer-v2", headers=AUTH).status_code == 409
        assert httpx.delete(f"{url}/admin/routes/w", headers=AUTH).status_code == 200
        assert httpx.delete(f"{url}/admin/adapters/writer-v2", headers=AUTH).status_code == 200
        assert "writer-v2" not in _vllm_models(front)

    def test_the_admin_api_needs_the_token(
        self, front: dict, tiny_adapters: dict[str, Path]
    ) -> None:
        source = {"source": str(tiny_adapters["proposal-writer"])}
        response = httpx.put(f"{front['url']}/admin/adapters/sneaky", json=source)
        assert response.status_code == 401
        assert "sneaky" not in _vllm_models(front)

    def test_sigterm_stops_vllm_with_the_front(self, front: dict) -> None:
        # Last: the module's front is gone after it.
        process: subprocess.Popen = front["process"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(90) == 0
        with pytest.raises(httpx.TransportError):
            front["vllm"].get("/health", timeout=5)
        assert not Path(front["uds"]).exists()
