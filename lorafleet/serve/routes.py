"""Adapter routes: public model names -> adapter versions with traffic weights.

A route such as ``proposal-writer -> proposal-writer-v3: 90, proposal-writer-v4: 10`` is
an adapter-level canary. A request's ``model`` that names a route is sent to one of its
targets at random in proportion to the weights or, when the route has a
``sticky_header`` and the request carries it, by a hash of that header's value (the same
user stays on the same version while the weights hold). Any other ``model`` passes
through unchanged.

The table lives in the runtime (:class:`~lorafleet.serve.model.LorafleetRuntime`) and in
the standalone router proxy (:mod:`lorafleet.serve.proxy`). In both, weights change at
runtime through ``GET/PUT/DELETE /admin/routes/{name}`` (bearer token), with the JSON
body of :class:`Route`::

    {"targets": [{"adapter": "proposal-writer-v3", "weight": 90},
                 {"adapter": "proposal-writer-v4", "weight": 10}],
     "sticky_header": "x-user-id"}
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Mapping
from pathlib import Path

from fastapi import APIRouter
from pydantic import BaseModel, Field, field_validator, model_validator

from lorafleet.errors import LorafleetError
from lorafleet.serve.adapters import ADAPTER_NAME, AdapterRejected, validate_name
from lorafleet.serve.admin import table_admin_router

__all__ = ["Route", "RouteTable", "RouteTarget", "routes_admin_router"]


class RouteTarget(BaseModel):
    """One adapter version of a route and its share of the traffic."""

    # The pattern is published in the schema; the validator words the refusal.
    adapter: str = Field(json_schema_extra={"pattern": f"^{ADAPTER_NAME.pattern}$"})
    weight: float = Field(ge=0)

    @field_validator("adapter")
    @classmethod
    def _name(cls, value: str) -> str:
        try:
            return validate_name(value)
        except AdapterRejected as exc:
            raise ValueError(exc.detail) from None


class Route(BaseModel):
    """A public model name's targets; weights are relative (90/10 or 0.9/0.1 alike)."""

    targets: list[RouteTarget] = Field(min_length=1)
    sticky_header: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Route:
        names = [t.adapter for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError("each adapter may appear once in a route")
        if sum(t.weight for t in self.targets) <= 0:
            raise ValueError("at least one target needs a positive weight")
        return self

    def pick(self, route_name: str, headers: Mapping[str, str], rng: random.Random) -> str:
        """The adapter for one request (see the module docstring)."""
        total = sum(t.weight for t in self.targets)
        key = headers.get(self.sticky_header) if self.sticky_header else None
        if key is not None:
            digest = hashlib.sha256(f"{route_name}\0{key}".encode()).digest()
            point = int.from_bytes(digest[:8], "big") / 2**64 * total
        else:
            point = rng.random() * total
        for target in self.targets:
            if point < target.weight:
                return target.adapter
            point -= target.weight
        return next(t.adapter for t in reversed(self.targets) if t.weight > 0)


class RouteTable:
    """Routes by public name; changed only on the event loop, so no locking.

    Args:
        routes: the initial routes.
        seed: seed of the random choice (tests); system randomness when ``None``.
    """

    def __init__(self, routes: Mapping[str, Route] | None = None, seed: int | None = None) -> None:
        self._routes: dict[str, Route] = {}
        for name, route in (routes or {}).items():
            self.set(name, route)
        self._rng = random.Random(seed)

    @classmethod
    def from_file(cls, path: str | Path) -> RouteTable:
        """Read ``{"routes": {name: Route}}`` from a JSON file.

        Raises:
            LorafleetError: naming the file and the field, if it is malformed.
        """
        try:
            raw = json.loads(Path(path).read_text())
            return cls({n: Route.model_validate(r) for n, r in raw["routes"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            detail = str(exc).splitlines()[0] if not isinstance(exc, KeyError) else "no 'routes'"
            raise LorafleetError(f"{path}: routes file: {detail}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._routes

    def get(self, name: str) -> Route | None:
        """The route of a public name, if any."""
        return self._routes.get(name)

    def set(self, name: str, route: Route) -> None:
        """Add or replace a route."""
        self._routes[validate_name(name)] = route

    def delete(self, name: str) -> None:
        """Remove a route; raises ``KeyError`` if there is none."""
        del self._routes[name]

    def as_dict(self) -> dict[str, dict]:
        """Every route as JSON-ready dicts."""
        return {name: route.model_dump() for name, route in self._routes.items()}

    def resolve(self, model: str, headers: Mapping[str, str]) -> str:
        """The adapter a request for ``model`` goes to (``model`` itself if no route)."""
        route = self._routes.get(model)
        return model if route is None else route.pick(model, headers, self._rng)


def routes_admin_router(
    table: RouteTable, token: str | None, known: Callable[[str], bool] | None = None
) -> APIRouter:
    """``GET /admin/routes`` and ``GET/PUT/DELETE /admin/routes/{name}`` behind a bearer token.

    Args:
        table: the table to read and change.
        token: the admin bearer token (``None``: admin API disabled).
        known: says whether an adapter name is served; a PUT naming an unknown target is
            refused (422). ``None`` (a proxy that cannot tell) accepts any name.
    """

    def check(name: str, route: Route) -> str | None:
        validate_name(name)
        unknown = [t.adapter for t in route.targets if known is not None and not known(t.adapter)]
        return f"route {name!r}: adapters not loaded: {', '.join(unknown)}" if unknown else None

    return table_admin_router(
        "routes",
        Route,
        table,
        token,
        missing=lambda name: f"no route {name!r}",
        deleted=lambda name: {"name": name, "status": "deleted"},
        check=check,
    )
