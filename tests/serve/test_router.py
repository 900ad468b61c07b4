"""Route tables: weighted and sticky choice, validation, and the routes file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from lorafleet.errors import LorafleetError
from lorafleet.serve.routes import Route, RouteTable


def canary(v3: float, v4: float, sticky: str | None = None) -> Route:
    return Route.model_validate(
        {
            "targets": [
                {"adapter": "writer-v3", "weight": v3},
                {"adapter": "writer-v4", "weight": v4},
            ],
            "sticky_header": sticky,
        }
    )


def test_weights_split_traffic_in_proportion() -> None:
    table = RouteTable({"proposal-writer": canary(90, 10)}, seed=7)
    picks = Counter(table.resolve("proposal-writer", {}) for _ in range(4000))
    # Binomial(4000, 0.1): mean 400, sd 19; 300..500 is more than 5 sd either way.
    assert set(picks) == {"writer-v3", "writer-v4"}
    assert 300 <= picks["writer-v4"] <= 500


def test_zero_weight_target_gets_nothing_and_unrouted_names_pass_through() -> None:
    table = RouteTable({"proposal-writer": canary(1, 0)}, seed=1)
    assert {table.resolve("proposal-writer", {}) for _ in range(200)} == {"writer-v3"}
    assert table.resolve("job-analyzer", {}) == "job-analyzer"


def test_sticky_header_is_stable_and_spreads_users() -> None:
    table = RouteTable({"w": canary(50, 50, sticky="x-user-id")})
    users = [{"x-user-id": f"user-{i}"} for i in range(200)]
    first = [table.resolve("w", u) for u in users]
    assert [table.resolve("w", u) for u in users] == first
    assert 60 <= Counter(first)["writer-v4"] <= 140
    # Moving weight to v4 only moves users towards v4 (the hash point stays put)
    table.set("w", canary(10, 90, sticky="x-user-id"))
    moved = [table.resolve("w", u) for u in users]
    assert all(m == "writer-v4" for f, m in zip(first, moved, strict=True) if f == "writer-v4")


@pytest.mark.parametrize(
    "body",
    [
        {"targets": []},
        {"targets": [{"adapter": "a", "weight": 0}]},
        {"targets": [{"adapter": "a", "weight": -1}]},
        {"targets": [{"adapter": "a", "weight": 1}, {"adapter": "a", "weight": 1}]},
        {"targets": [{"adapter": "../a", "weight": 1}]},
    ],
)
def test_invalid_routes_are_refused(body: dict) -> None:
    with pytest.raises(ValidationError):
        Route.model_validate(body)


def test_routes_file(tmp_path: Path) -> None:
    good = tmp_path / "routes.json"
    good.write_text(json.dumps({"routes": {"proposal-writer": canary(9, 1).model_dump()}}))
    assert RouteTable.from_file(good).as_dict() == {"proposal-writer": canary(9, 1).model_dump()}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"routes": {"w": {"targets": [{"adapter": "a", "weight": 0}]}}}))
    with pytest.raises(LorafleetError, match=r"bad\.json"):
        RouteTable.from_file(bad)
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(LorafleetError, match="no 'routes'"):
        RouteTable.from_file(tmp_path / "empty.json")
