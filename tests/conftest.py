"""Shared fixtures: a tiny demo base model and LoRA adapters on it, built once per session,
a scripted OpenAI-compatible HTTP server for the clients' failure paths, and a real
S3-compatible server (moto) on 127.0.0.1 for everything that reads or writes s3://."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest

from lorafleet.base import DemoBaseConfig, build_demo_base

from .cli_support import run_lorafleet

# Builds in about a second. 30 pre-training steps lift greedy output above one repeated token.
TINY_BASE = DemoBaseConfig(
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
    "A good profile lists recent work, rates and the hours the freelancer can give.",
    "The job analyzer reads the post and names the skills, the budget and the deadline.",
    "Candidates are compared on skills, reviews and how well they read the brief.",
] * 8

# name -> (rank, target modules): different ranks and modules, so a mixed batch mixes shapes.
TINY_ADAPTERS = {
    "proposal-writer": (4, ["q_proj", "v_proj"]),
    "job-analyzer": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama model directory with a ChatML tokenizer."""
    return build_demo_base(CORPUS, TINY_BASE, cache_dir=tmp_path_factory.mktemp("lorafleet-cache"))


@pytest.fixture(scope="session")
def tiny_adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two PEFT LoRA adapters on ``tiny_base`` with random, non-zero B weights.

    ``init_lora_weights=False`` keeps PEFT from zeroing B, and ``lora_alpha = 8 x rank``
    (4x the usual) makes the random update strong, so each adapter visibly changes the output.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    adapters = {}
    for seed, (name, (rank, targets)) in enumerate(TINY_ADAPTERS.items()):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_base)
        config = LoraConfig(
            r=rank, lora_alpha=8 * rank, target_modules=targets, init_lora_weights=False
        )
        get_peft_model(model, config).save_pretrained(root / name)
        adapters[name] = root / name
    return adapters


class OpenAIStub:
    """A real HTTP server on 127.0.0.1 that answers every POST as a chat completion, from a script.

    The project's runtime serves real completions but cannot be made to answer 429, a
    ``Retry-After`` or a malformed 200; this server can. Each request takes the next
    ``(status, body, headers)`` from :attr:`script` (a ``str`` body is sent as it is); once the
    script is used up, it answers a well-formed completion whose text is ``answer(request)``.
    Every request is kept in :attr:`requests` as ``{"path", "body", "authorization"}``.
    """

    def __init__(self) -> None:
        self.script: list[tuple[int, object, dict[str, str]]] = []
        self.answer: Callable[[dict], str] = lambda request: "[[A]]"
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with stub._lock:
                    stub.requests.append(
                        {
                            "path": self.path,
                            "body": request,
                            "authorization": self.headers.get("authorization"),
                        }
                    )
                    scripted = stub.script.pop(0) if stub.script else None
                status, body, headers = scripted or (
                    200,
                    stub.completion(stub.answer(request), request.get("model", "stub")),
                    {},
                )
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.url = self.root + "/v1"
        # A short poll interval: shutdown() in the finalizer returns within it.
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @staticmethod
    def completion(text: str, model: str = "stub") -> dict:
        """A well-formed chat completion answering ``text``."""
        return {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def openai_stub() -> Iterator[OpenAIStub]:
    """A scripted OpenAI-compatible server; its API root is ``openai_stub.url``."""
    stub = OpenAIStub()
    try:
        yield stub
    finally:
        stub.close()


# --- S3 (moto) -------------------------------------------------------------------------

S3_BUCKET = "lorafleet-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _moto_server(extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """Start ``moto_server`` on a free port, wait until it answers, kill it afterwards."""
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(extra_env or {})},
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint}") from None
                time.sleep(0.05)
        yield endpoint
    finally:
        server.kill()
        server.wait()


@pytest.fixture(scope="session")
def aws_env() -> Iterator[None]:
    """Credentials and region for the test server, found by botocore's standard chain."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session")
def s3_endpoint(aws_env: None) -> Iterator[str]:
    """The URL of a moto S3 server on 127.0.0.1 holding the bucket ``S3_BUCKET``
    (``lorafleet-test``); tests share it, so each writes under its own prefix."""
    with _moto_server() as url:
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=S3_BUCKET)
        yield url


@pytest.fixture(scope="session")
def start_moto_server() -> Callable[..., AbstractContextManager[str]]:
    """Start another moto server: ``with start_moto_server({"ENV": "x"}) as url: ...``."""
    return _moto_server


@pytest.fixture
def unreachable_endpoint() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connections are refused)."""
    return f"http://127.0.0.1:{_free_port()}"


# --- concurrency ----------------------------------------------------------------------


def _run_together(count: int, call: Callable[[int], object]) -> list[object]:
    """``call(0)`` … ``call(count - 1)`` in ``count`` threads released at the same moment
    (a barrier); the results in index order. The first exception any call raised is
    raised here, after every thread has ended."""
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=20)
            results[i] = call(i)
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a concurrent call did not finish in 60 s"
    if errors:
        raise errors[0]
    return results


@pytest.fixture
def run_together() -> Callable[[int, Callable[[int], object]], list[object]]:
    """Run ``call(i)`` for ``i`` in ``range(count)`` in threads started at once (writers
    racing for one version number, one pointer)."""
    return _run_together


@pytest.fixture
def contended_increment() -> Callable[[int], tuple[Callable[[object], dict], list[int]]]:
    """A counter increment (for ``Storage.update_json``) whose first call in each thread
    waits until all ``writers`` have read, so all but one lose the first race; also the
    list of calls made."""

    def make(writers: int) -> tuple[Callable[[object], dict], list[int]]:
        barrier, seen, calls = threading.Barrier(writers), threading.local(), []

        def increment(value: object) -> dict:
            calls.append(1)
            if not getattr(seen, "waited", False):
                seen.waited = True
                barrier.wait(timeout=20)
            return {"count": (value or {"count": 0})["count"] + 1}  # type: ignore[index]

        return increment, calls

    return make


@pytest.fixture
def one_line() -> Callable[[pytest.ExceptionInfo[BaseException]], str]:
    """The raised error's message, asserted to be one non-empty line."""

    def check(error: pytest.ExceptionInfo[BaseException]) -> str:
        text = str(error.value)
        assert text and "\n" not in text
        return text

    return check


# --- file trees -----------------------------------------------------------------------


@pytest.fixture
def make_tree() -> Callable[[Path], dict[str, bytes]]:
    """Write a small adapter-like tree under a folder (a nested file, a non-ASCII path, a
    random binary) and return ``{relative path: bytes}``."""

    def make(root: Path) -> dict[str, bytes]:
        files = {
            "adapter_config.json": b'{"r": 8}',
            "weights/model.bin": os.urandom(4000),
            "é/ü.txt": b"x",
        }
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        return files

    return make


@pytest.fixture
def lorafleet_cli() -> Callable[..., subprocess.CompletedProcess]:
    """The real CLI in a subprocess: ``lorafleet_cli(*args, cwd=, env=None, timeout=120)``."""
    return run_lorafleet
