"""The runtime's and the router's HTTP APIs, fuzzed from their own OpenAPI schemas.

`schemathesis <https://schemathesis.readthedocs.io>`_ reads each server's
``/openapi.json`` and sends, for every published operation, requests its schema admits
(positive) and requests it forbids (negative): at least 2,000 per server, with a fixed
seed, against real servers on 127.0.0.1 (the runtime on the tiny base with its two
adapters, and the standalone router in front of it). Every answer must pass
schemathesis' checks: no 5xx; a status the schema documents, with its content type and
its body schema; a forbidden request refused with a 4xx; an admitted one not refused with
400. API keys and the admin token are on, so the fuzzing reaches behind them. The
runtime's ``--max-tokens-limit 4`` keeps each completion short (the published schema
says so), which keeps the whole module inside ``make test``'s budget (about a minute
on two cores).

Left out, on purpose: ``PUT /admin/faults/{key}``, whose job is to make an adapter answer
5xx (tested in ``test_faults.py``), and ``PUT /admin/adapters/{name}``, whose admission
checks read the given source (tested in ``test_admin.py`` and ``test_adapters.py``).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from lorafleet.serve.runtime import run_server_subprocess, wait_ready

pytestmark = pytest.mark.integration

SEED = 17
# Requests per operation, mode and round; operations with few possible inputs send fewer.
# Rounds (seeds SEED, SEED + 1, ...) repeat until MIN_REQUESTS were sent.
EXAMPLES = {GenerationMode.POSITIVE: 160, GenerationMode.NEGATIVE: 100}
MIN_REQUESTS = 2000
SECRET = "fuzz-secret"  # both the API key and the admin token: one Authorization header
AUTH = {"Authorization": f"Bearer {SECRET}"}
# A request the schema admits may still be refused for what it means: 422 is an admin
# PUT naming an adapter that is not loaded (a route target) or that fails admission.
ADMITTED_BUT_REFUSED = ["2xx", "3xx", "401", "403", "404", "409", "422", "429"]
RUNTIME_CHECKS = {"positive_data_acceptance": {"expected-statuses": ADMITTED_BUT_REFUSED}}
# The router checks only what it needs (a JSON object, a string `model`, a boolean
# `stream`) and passes the rest to the upstream, whose refusals (400: no `messages`,
# `max_tokens` over its limit) it passes on: an admitted request may get a 400 there.
ROUTER_CHECKS = {"positive_data_acceptance": {"enabled": False}}


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text(f"fuzz:{SECRET}:1000000\n")
    return path


@pytest.fixture(scope="module")
def runtime_url(tiny_base: Path, tiny_adapters: dict[str, Path], keys_file: Path) -> Iterator[str]:
    args = ["--max-tokens-limit", "4", "--api-keys-file", str(keys_file)]
    env = {"LORAFLEET_ADMIN_TOKEN": SECRET}
    with run_server_subprocess(tiny_base, tiny_adapters, extra_args=args, env=env) as url:
        yield url


@pytest.fixture(scope="module")
def router_url(runtime_url: str, keys_file: Path, tmp_path_factory: pytest.TempPathFactory):
    routes = tmp_path_factory.mktemp("routes") / "routes.json"
    targets = [
        {"adapter": "proposal-writer", "weight": 1},
        {"adapter": "job-analyzer", "weight": 1},
    ]
    routes.write_text(json.dumps({"routes": {"writer": {"targets": targets}}}))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "lorafleet.serve.router", "--upstream", runtime_url]
    cmd += ["--port", str(port), "--routes", str(routes), "--api-keys-file", str(keys_file)]
    env = {**os.environ, "LORAFLEET_ADMIN_TOKEN": SECRET}
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 60, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=15)


def send_examples(
    operation: schemathesis.APIOperation,
    mode: GenerationMode,
    round_seed: int,
    url: str,
    session: requests.Session,
    sent: Counter[str],
) -> None:
    """Send ``operation``'s examples of one mode, checking every answer; raises on the
    first failure (shrunk by hypothesis to the simplest request that shows it)."""

    @seed(round_seed)
    @settings(
        max_examples=EXAMPLES[mode],
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def send(case: schemathesis.Case) -> None:
        sent[operation.label] += 1
        case.call_and_validate(base_url=url, session=session, headers=AUTH)

    send()


def fuzz(url: str, checks: dict[str, dict], skip: dict[str, str]) -> tuple[Counter[str], list[str]]:
    """Send every operation of ``url``'s schema (but ``skip``: path -> method) its positive
    and negative examples, with schemathesis' checks (configured by ``checks``); the
    requests sent per operation, and one line per failing operation."""
    config = schemathesis.Config.from_dict({"checks": checks})
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=config)
    for path, method in skip.items():
        schema = schema.exclude(path=path, method=method)
    sent: Counter[str] = Counter()
    failures = []
    operations = [result.ok() for result in schema.get_all_operations()]
    round_seed = SEED
    with requests.Session() as session:
        while sum(sent.values()) < MIN_REQUESTS and not failures:
            for operation, mode in itertools.product(operations, EXAMPLES):
                try:
                    send_examples(operation, mode, round_seed, url, session, sent)
                except Unsatisfiable:  # nothing to break: no body, only string parameters
                    continue
                except Exception as exc:  # every failing operation is reported, not the first
                    failures.append(f"{operation.label} ({mode.value}): {exc}")
            round_seed += 1
    return sent, failures


def check(sent: Counter[str], failures: list[str]) -> None:
    assert not failures, "\n\n".join(failures)
    print(f"{sum(sent.values())} requests over {len(sent)} operations")
    assert sum(sent.values()) >= MIN_REQUESTS, sent


def test_runtime_schema_holds_under_fuzzing(runtime_url: str) -> None:
    skip = {"/admin/faults/{key}": "PUT", "/admin/adapters/{name}": "PUT"}
    sent, failures = fuzz(runtime_url, RUNTIME_CHECKS, skip)
    check(sent, failures)
    # the OpenAI routes were fuzzed too, not only the cheap ones
    assert sent["POST /openai/v1/chat/completions"] >= 100


def test_router_schema_holds_under_fuzzing(router_url: str) -> None:
    sent, failures = fuzz(router_url, ROUTER_CHECKS, {})
    check(sent, failures)
    assert sent["POST /openai/v1/chat/completions"] >= 100


def test_runtime_publishes_only_what_it_serves(runtime_url: str) -> None:
    """KServe's inference protocol routes are gone: they answered client mistakes with 5xx
    (501 for any model_version, 503 for loading an unknown model)."""
    with requests.Session() as http:
        paths = set(http.get(f"{runtime_url}/openapi.json").json()["paths"])
        version = http.get(f"{runtime_url}/v2/models/base/versions/1/ready")
        load = http.post(f"{runtime_url}/v2/repository/models/nope/load")
        ready = http.get(f"{runtime_url}/v2/models/base/ready")
    assert {"/v2/health/live", "/v2/health/ready", "/metrics", "/openai/v1/models"} <= paths
    assert not [p for p in paths if "infer" in p or "repository" in p or "versions" in p]
    assert (version.status_code, load.status_code) == (404, 404)
    assert ready.json() == {"name": "base", "ready": True}
