"""Rollout fixtures: the router as a real subprocess on 127.0.0.1, the admin token, kmock wiring."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

TOKEN = "rollout-test-token"
KSERVE_ISVC = "serving.kserve.io/v1beta1/inferenceservices"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, process: subprocess.Popen) -> None:
    """Until ``url`` answers 200 (or the process exits, or the time is up)."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not up after {timeout} s")
        time.sleep(0.1)


@contextlib.contextmanager
def run_router(upstream: str, routes: dict, ready_path: str = "/v2/health/live") -> Iterator[str]:
    """``python -m lorafleet.serve.router`` in a child process for a ``with`` block; yields its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        routes_file = Path(tmp) / "routes.json"
        routes_file.write_text(json.dumps({"routes": routes}))
        cmd = [
            sys.executable,
            "-m",
            "lorafleet.serve.router",
            "--upstream",
            upstream,
            "--routes",
            str(routes_file),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        with tempfile.TemporaryFile() as log:
            process = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "LORAFLEET_ADMIN_TOKEN": TOKEN},
            )
            url = f"http://127.0.0.1:{port}"
            try:
                try:
                    wait_http(url + ready_path, 60, process)
                except (TimeoutError, RuntimeError) as exc:
                    log.seek(0)
                    exc.add_note(log.read()[-3000:].decode(errors="replace"))
                    raise
                yield url
            finally:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@pytest.fixture
def admin_token(monkeypatch: pytest.MonkeyPatch) -> str:
    """The router's admin token, in the environment as the actuator reads it."""
    monkeypatch.setenv("LORAFLEET_ADMIN_TOKEN", TOKEN)
    return TOKEN


@pytest.fixture
def k8s(kmock):
    """An official-client ApiClient on kmock's KubernetesEmulator (ConfigMaps, InferenceServices)."""
    from kubernetes.client import ApiClient, Configuration

    kmock.resources[KSERVE_ISVC] = {}
    kmock.resources["v1/configmaps"] = {}
    with ApiClient(Configuration(host=str(kmock.url).rstrip("/"))) as client:
        yield client


@pytest.fixture(scope="session")
def rkit() -> SimpleNamespace:
    """Helpers for the test modules (conftest cannot be imported under importlib mode)."""
    return SimpleNamespace(
        TOKEN=TOKEN, free_port=free_port, run_router=run_router, wait_http=wait_http
    )


class PrometheusAPI:
    """A small real HTTP server answering ``GET /api/v1/query`` in the Prometheus API's shape.

    It stands in for Prometheus only at the HTTP boundary: the source under test sends real
    requests and parses real JSON. Values come from :attr:`values`, keyed by the metric
    (``requests``, ``error_rate``, ``p95_latency_ms``, ``judge_score``) and the version named in
    the query's ``adapter="..."`` or ``revision_name="..."`` label; a missing key is an empty
    vector. Every query received is kept in :attr:`queries`.
    """

    def __init__(self) -> None:
        import re
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlparse

        self.values: dict[tuple[str, str], float] = {}
        self.queries: list[str] = []
        self.fail = False
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query).get("query", [""])[0]
                api.queries.append(query)
                if api.fail or url.path != "/api/v1/query":
                    self._send(
                        503,
                        {
                            "status": "error",
                            "errorType": "unavailable",
                            "error": "down for the test",
                        },
                    )
                    return
                version = re.search(r'(?:adapter|revision_name)="([^"]+)"', query)
                kind = api.kind(query)
                value = api.values.get((kind, version.group(1) if version else ""))
                result = (
                    []
                    if value is None
                    else [{"metric": {}, "value": [1700000000.0, repr(float(value))]}]
                )
                self._send(
                    200, {"status": "success", "data": {"resultType": "vector", "result": result}}
                )

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def kind(query: str) -> str:
        if "judge" in query:
            return "judge_score"
        if "histogram_quantile" in query:
            return "p95_latency_ms"
        if " / " in query:
            return "error_rate"
        return "requests"

    def set(
        self,
        version: str,
        requests: float | None = None,
        error_rate: float | None = None,
        p95_latency_ms: float | None = None,
        judge_score: float | None = None,
    ) -> None:
        """Set (or, with ``None``, clear) one version's numbers."""
        for kind, value in (
            ("requests", requests),
            ("error_rate", error_rate),
            ("p95_latency_ms", p95_latency_ms),
            ("judge_score", judge_score),
        ):
            if value is None:
                self.values.pop((kind, version), None)
            else:
                self.values[(kind, version)] = value

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def prometheus() -> Iterator[PrometheusAPI]:
    """A Prometheus-API-shaped HTTP server on 127.0.0.1 (see :class:`PrometheusAPI`)."""
    api = PrometheusAPI()
    yield api
    api.close()
