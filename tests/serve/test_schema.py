"""The published OpenAPI schemas say what the runtime and router accept and answer.

Each test here pins one mismatch that fuzzing (``test_fuzz.py``) found, in process and
fast: the apps are called through ``httpx.ASGITransport`` (the runtime is not loaded:
every case is refused before anything is generated).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from lorafleet.serve.limits import RequestLimits
from lorafleet.serve.model import LorafleetRuntime
from lorafleet.serve.openai_api import CompletionRequest
from lorafleet.serve.proxy import proxy_app
from lorafleet.serve.routes import RouteTable
from lorafleet.serve.server import mount

TOKEN = "admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def app(tiny_base: Path) -> FastAPI:
    app = FastAPI()
    limits = RequestLimits(max_tokens=7, max_prompt_chars=99)
    mount(app, LorafleetRuntime("base", tiny_base, {}, limits=limits), TOKEN)
    return app


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        yield client


def test_completion_bodies_and_answers_are_published_with_the_limits(app: FastAPI) -> None:
    paths = app.openapi()["paths"]
    chat = paths["/openai/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]
    assert chat["requestBody"]["required"] is True
    assert set(body["required"]) == {"model", "messages"}
    budget = [b for b in body["properties"]["max_tokens"]["anyOf"] if b["type"] == "integer"]
    assert budget == [{"type": "integer", "minimum": 1, "maximum": 7}]
    content = body["properties"]["messages"]["items"]["properties"]["content"]
    assert content["maxLength"] == 99
    assert "$ref" not in str(body)  # pydantic's $defs do not resolve in an OpenAPI document
    assert set(chat["responses"]) == {"200", "400", "401", "404", "429", "500", "503"}
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    prompt = paths["/openai/v1/completions"]["post"]["requestBody"]["content"]
    assert prompt["application/json"]["schema"]["properties"]["prompt"]["maxLength"] == 99
    put_route = paths["/admin/routes/{key}"]["put"]
    assert (
        "targets" in put_route["requestBody"]["content"]["application/json"]["schema"]["required"]
    )
    assert {"401", "403", "422"} <= set(put_route["responses"])


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", "5"), ("max_tokens", True), ("stream", 1), ("stream", "yes"), ("stop", 3)],
)
async def test_completion_fields_have_their_json_types(
    http: httpx.AsyncClient, field: str, value: object
) -> None:
    body = {"model": "base", "prompt": "Hello", field: value}
    response = await http.post("/openai/v1/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(field)


def test_a_whole_number_written_as_a_float_is_a_budget() -> None:
    # JSON Schema's "integer" admits 5.0, so the server does too
    body = '{"model": "m", "prompt": "p", "max_tokens": 5.0}'
    assert CompletionRequest.model_validate_json(body).max_tokens == 5


async def test_admin_bodies_have_their_json_types(http: httpx.AsyncClient) -> None:
    fault = {"error_rate": 0.0, "added_latency_ms": False}
    response = await http.put("/admin/faults/expert", json=fault, headers=AUTH)
    assert response.status_code == 422, response.text
    assert "added_latency_ms" in response.json()["error"]["message"]


async def test_method_not_allowed_lists_every_method_of_the_path(http: httpx.AsyncClient) -> None:
    response = await http.request("OPTIONS", "/admin/routes/w", headers=AUTH)
    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, GET, HEAD, PUT"


def test_routes_added_after_mount_are_dropped_at_startup(app: FastAPI) -> None:
    # Given KServe's way: its v1/v2 routes are added to the app after ours
    @app.post("/v2/models/{name}/infer")
    async def infer(name: str) -> dict:
        raise NotImplementedError

    # When the server starts, Then they are gone, from the app and from its schema
    with TestClient(app) as client:
        assert client.post("/v2/models/base/infer").status_code == 404
        assert client.get("/v2/models/base/ready").json() == {"name": "base", "ready": False}
        assert client.get("/v2/models/nope/ready").status_code == 404
        paths = client.get("/openapi.json").json()["paths"]
    assert "/v2/models/{name}/infer" not in paths
    assert {"/v2/health/live", "/v2/health/ready", "/metrics"} <= set(paths)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": "caf\u00e9\u0011", "messages": []}, 200),  # was a 500: not a header value
        ({"model": {}, "messages": []}, 400),  # was a 500: unhashable route name
        ({"model": "m", "stream": "yes"}, 400),
        (["model"], 400),
    ],
)
async def test_router_answers_odd_bodies_without_a_5xx(
    openai_stub, body: object, status: int
) -> None:
    app = proxy_app(openai_stub.root, RouteTable())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        response = await client.post("/openai/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
