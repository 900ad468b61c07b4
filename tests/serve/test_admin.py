"""The admin API, the in-process router and the runtime's back-pressure, driven over ASGI.

A real runtime (tiny base, real adapters, real continuous batcher) is mounted on a bare
FastAPI app and called through ``httpx.ASGITransport``: everything but the socket.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from lorafleet.engine.generation import GenerationRequest, Generator
from lorafleet.serve.model import LorafleetRuntime, build_runtime
from lorafleet.serve.server import listening_line, mount
from lorafleet.storage import Storage

from ..conftest import S3_BUCKET

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOKEN = "s3cret-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def ask(model: str, content: str = "Write a proposal.", max_tokens: int = 6) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def served(
    tiny_base: Path, fleet_adapters: dict[str, Path]
) -> AsyncIterator[tuple[LorafleetRuntime, httpx.AsyncClient]]:
    runtime = build_runtime(
        tiny_base, {n: fleet_adapters[n] for n in ("expert-0", "expert-1")}, max_wait_s=0.005
    )
    app = FastAPI()
    mount(app, runtime, TOKEN)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://runtime") as client:
        yield runtime, client
    runtime.batcher.close()


async def answer(client: httpx.AsyncClient, model: str, **headers: str) -> httpx.Response:
    response = await client.post("/openai/v1/chat/completions", json=ask(model), headers=headers)
    assert response.status_code == 200, response.text
    return response


def text_of(response: httpx.Response) -> str:
    return response.json()["choices"][0]["message"]["content"]


async def test_admin_needs_the_bearer_token(served, tiny_base: Path) -> None:
    _, client = served
    assert (await client.get("/admin/adapters")).status_code == 401
    wrong = {"authorization": "Bearer nope"}
    assert (await client.get("/admin/adapters", headers=wrong)).status_code == 401
    listing = await client.get("/admin/adapters", headers=AUTH)
    assert listing.status_code == 200
    assert [a["name"] for a in listing.json()["adapters"]] == ["expert-0", "expert-1"]


async def test_admin_is_off_without_a_token(tiny_base: Path) -> None:
    app = FastAPI()
    mount(app, LorafleetRuntime("base", tiny_base, {}), None)  # no load(): routes only
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as c:
        response = await c.put("/admin/adapters/a", json={"source": "/x"}, headers=AUTH)
    assert response.status_code == 403


async def test_load_new_version_and_unload(
    served, fleet_adapters: dict[str, Path], tiny_base: Path
) -> None:
    runtime, client = served
    # Given expert-2 loaded at runtime
    put = await client.put(
        "/admin/adapters/writer", json={"source": str(fleet_adapters["expert-2"])}, headers=AUTH
    )
    assert put.status_code == 200, put.text
    v1 = text_of(await answer(client, "writer"))
    models = (await client.get("/openai/v1/models")).json()["data"]
    assert {"id": "writer", "parent": "base"}.items() <= next(
        m for m in models if m["id"] == "writer"
    ).items()
    # When a new version (expert-3's weights) replaces it under the same name
    put = await client.put(
        "/admin/adapters/writer", json={"source": str(fleet_adapters["expert-3"])}, headers=AUTH
    )
    assert put.status_code == 200, put.text
    # Then the name answers with the new weights (PEFT's answer for them, so the stacked
    # tables were rebuilt, not left stale), and only one version stays loaded
    v2 = text_of(await answer(client, "writer"))
    assert v2 != v1
    reference = Generator(tiny_base, {"v2": fleet_adapters["expert-3"]}, lora_backend="peft")
    request = GenerationRequest(messages=ask("v2")["messages"], adapter="v2", max_new_tokens=6)
    assert v2 == reference.generate([request])[0].text
    assert sum(k.startswith("writer__") for k in runtime._generator.adapters) == 1
    assert set(runtime._generator.lora_bank.slots) == set(runtime._generator.adapters)
    # And after unloading, the name is gone
    assert (await client.delete("/admin/adapters/writer", headers=AUTH)).status_code == 200
    gone = await client.post("/openai/v1/chat/completions", json=ask("writer"))
    assert gone.status_code == 404
    assert (await client.delete("/admin/adapters/writer", headers=AUTH)).status_code == 404


async def test_rejected_version_leaves_the_old_one_serving(
    served, fleet_adapters: dict[str, Path], copy_adapter
) -> None:
    _, client = served
    before = text_of(await answer(client, "expert-0"))
    bad = copy_adapter(fleet_adapters["expert-5"])
    (bad / "adapter_model.bin").write_bytes(b"pickle")
    put = await client.put("/admin/adapters/expert-0", json={"source": str(bad)}, headers=AUTH)
    assert put.status_code == 422
    assert put.json()["error"]["code"] == "format"
    assert "pickle" in put.json()["error"]["message"]
    assert text_of(await answer(client, "expert-0")) == before


@pytest.mark.integration  # a real S3-compatible server on 127.0.0.1
async def test_load_from_s3_and_refuse_a_missing_one(
    served,
    fleet_adapters: dict[str, Path],
    s3_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, client = served
    # Given expert-6 in a bucket, and the runtime told the endpoint the standard way
    prefix = f"s3://{S3_BUCKET}/{uuid.uuid4().hex}"
    Storage(s3_endpoint_url=s3_endpoint).upload_tree(fleet_adapters["expert-6"], f"{prefix}/v1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    # When it is loaded from there, it serves
    put = await client.put("/admin/adapters/remote", json={"source": f"{prefix}/v1"}, headers=AUTH)
    assert put.status_code == 200, put.text
    await answer(client, "remote")
    # And a version that is not in the bucket is refused in one line, reason "source"
    put = await client.put("/admin/adapters/remote", json={"source": f"{prefix}/v2"}, headers=AUTH)
    assert put.status_code == 422
    assert put.json()["error"] == {
        "code": "source",
        "message": f"adapter 'remote' rejected (source): {prefix}/v2: no objects under this prefix",
    }
    await answer(client, "remote")  # the loaded version keeps serving
    assert (await client.delete("/admin/adapters/remote", headers=AUTH)).status_code == 200


@pytest.mark.parametrize("name", ["..%2Fescape", "a.b", "x" * 70])
async def test_admin_refuses_unsafe_names(served, name: str, fleet_adapters) -> None:
    _, client = served
    source = {"source": str(fleet_adapters["expert-4"])}
    response = await client.put(f"/admin/adapters/{name}", json=source, headers=AUTH)
    assert response.status_code in (404, 422)  # %2F never reaches the handler as a name
    if response.status_code == 422:
        assert response.json()["error"]["code"] == "name"


async def test_route_weights_change_at_runtime(served) -> None:
    runtime, client = served
    route = {
        "targets": [{"adapter": "expert-0", "weight": 100}, {"adapter": "expert-1", "weight": 0}]
    }
    assert (await client.put("/admin/routes/proposal-writer", json=route, headers=AUTH)).is_success
    picked = [
        (await answer(client, "proposal-writer")).headers["x-lorafleet-adapter"] for _ in range(4)
    ]
    assert picked == ["expert-0"] * 4
    # The canary controller's move: shift all traffic to the other version
    route["targets"][0]["weight"], route["targets"][1]["weight"] = 0, 100
    assert (await client.put("/admin/routes/proposal-writer", json=route, headers=AUTH)).is_success
    assert (await client.get("/admin/routes/proposal-writer", headers=AUTH)).json() == {
        **route,
        "sticky_header": None,
    }
    picked = [
        (await answer(client, "proposal-writer")).headers["x-lorafleet-adapter"] for _ in range(4)
    ]
    assert picked == ["expert-1"] * 4
    # Per-version metrics tell the two apart
    requests = runtime.metrics.registry.get_sample_value
    labels = {"model": "proposal-writer", "status": "200"}
    assert requests("lorafleet_requests_total", {**labels, "adapter": "expert-0"}) >= 4
    assert requests("lorafleet_requests_total", {**labels, "adapter": "expert-1"}) >= 4
    tokens = requests(
        "lorafleet_completion_tokens_total", {"model": "proposal-writer", "adapter": "expert-1"}
    )
    assert tokens > 0
    assert (await client.delete("/admin/routes/proposal-writer", headers=AUTH)).is_success


async def test_routes_refuse_unknown_adapters_and_bad_weights(served) -> None:
    _, client = served
    unknown = {"targets": [{"adapter": "expert-9", "weight": 1}]}
    response = await client.put("/admin/routes/r", json=unknown, headers=AUTH)
    assert response.status_code == 422 and "expert-9" in response.json()["error"]["message"]
    zero = {"targets": [{"adapter": "expert-0", "weight": 0}]}
    assert (await client.put("/admin/routes/r", json=zero, headers=AUTH)).status_code == 422
    assert (await client.get("/admin/routes/r", headers=AUTH)).status_code == 404


async def test_sticky_header_pins_a_user_to_a_version(served) -> None:
    _, client = served
    route = {
        "targets": [{"adapter": "expert-0", "weight": 1}, {"adapter": "expert-1", "weight": 1}],
        "sticky_header": "x-user-id",
    }
    assert (await client.put("/admin/routes/sticky", json=route, headers=AUTH)).is_success
    seen = {}
    for user in range(12):
        picks = {
            (await answer(client, "sticky", **{"x-user-id": f"user-{user}"})).headers[
                "x-lorafleet-adapter"
            ]
            for _ in range(2)
        }
        assert len(picks) == 1, "one user, one version"
        seen[user] = picks.pop()
    assert set(seen.values()) == {"expert-0", "expert-1"}, "a 50/50 route uses both versions"


async def test_full_queue_answers_429_with_retry_after(
    tiny_base: Path, fleet_adapters: dict[str, Path]
) -> None:
    runtime = build_runtime(
        tiny_base, {"expert-0": fleet_adapters["expert-0"]}, max_batch_size=1, max_queue=1
    )
    app = FastAPI()
    mount(app, runtime, None)
    release = threading.Event()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://x"
        ) as client:
            # Given a worker busy between two steps and a full queue (one request waiting)
            busy = asyncio.ensure_future(runtime.batcher.run_exclusive(release.wait, 30))
            first = asyncio.ensure_future(
                client.post("/openai/v1/chat/completions", json=ask("expert-0"))
            )
            await asyncio.sleep(0.3)
            assert runtime.batcher.queue_depth == 1
            # When one more arrives
            second = await client.post("/openai/v1/chat/completions", json=ask("base"))
            # Then it is turned away at once, with a hint when to come back
            assert second.status_code == 429
            assert int(second.headers["retry-after"]) >= 1
            assert second.json()["error"]["code"] == "overloaded"
            release.set()
            await busy
            # And the one that waited is answered
            assert (await first).status_code == 200
    finally:
        release.set()
        runtime.batcher.close()


async def test_request_past_its_deadline_is_503_and_dropped(
    tiny_base: Path, fleet_adapters: dict[str, Path]
) -> None:
    runtime = build_runtime(
        tiny_base, {"expert-0": fleet_adapters["expert-0"]}, request_timeout_s=0.3
    )
    app = FastAPI()
    mount(app, runtime, None)
    release = threading.Event()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://x"
        ) as client:
            busy = asyncio.ensure_future(runtime.batcher.run_exclusive(release.wait, 30))
            late = await client.post("/openai/v1/chat/completions", json=ask("expert-0"))
            assert late.status_code == 503
            assert "retry-after" in late.headers
            release.set()
            await busy
            # The timed-out request never ran: every decode step holds only the new request
            assert (await client.post("/openai/v1/chat/completions", json=ask("base"))).is_success
            assert set(runtime.batcher.batch_sizes) == {1}
    finally:
        release.set()
        runtime.batcher.close()


async def test_get_one_adapter_and_a_put_without_json_content_type(
    served, fleet_adapters: dict[str, Path]
) -> None:
    _, client = served
    one = await client.get("/admin/adapters/expert-0", headers=AUTH)
    assert one.status_code == 200 and one.json()["name"] == "expert-0"
    assert (await client.get("/admin/adapters/nope", headers=AUTH)).status_code == 404
    # A body sent without a JSON content type is read all the same (as routes and faults are)
    put = await client.put(
        "/admin/adapters/plain",
        content=f'{{"source": "{fleet_adapters["expert-2"]}"}}',
        headers={**AUTH, "content-type": "text/plain"},
    )
    assert put.status_code == 200, put.text
    # and a bad body is one message naming the field, not FastAPI's raw 422
    bad = await client.put("/admin/adapters/plain", content="{}", headers=AUTH)
    assert bad.status_code == 422
    assert bad.json() == {"error": {"message": "source: Field required", "code": "body"}}
    assert (await client.delete("/admin/adapters/plain", headers=AUTH)).status_code == 200


async def test_an_adapter_a_route_targets_cannot_be_unloaded(served) -> None:
    _, client = served
    route = {
        "targets": [{"adapter": "expert-0", "weight": 90}, {"adapter": "expert-1", "weight": 10}]
    }
    assert (await client.put("/admin/routes/writer-route", json=route, headers=AUTH)).is_success
    refused = await client.delete("/admin/adapters/expert-1", headers=AUTH)
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "in_use"
    assert "'writer-route'" in refused.json()["error"]["message"]
    await answer(client, "expert-1")  # still serving
    assert (await client.delete("/admin/routes/writer-route", headers=AUTH)).is_success


async def test_the_listening_line_names_the_address_and_every_model(served) -> None:
    runtime, _ = served
    line = listening_line(runtime, "127.0.0.1", 8080)
    assert line.startswith("listening on http://127.0.0.1:8080 (OpenAI API at /openai/v1")
    assert line.endswith(", ".join([runtime.name, *runtime.adapters, *runtime.routes.as_dict()]))
    assert "\n" not in line
