"""Fault injection for canary drills: make one adapter slow or failing, on purpose.

A rollout's automatic rollback is only trusted once it has been seen to fire. A drill
sets a fault on the *candidate* adapter of a running runtime and watches the rollout
roll it back; every other adapter, the stable version included, is untouched. Faults are
off unless set, and set only at startup (``--fault NAME:error_rate=0.3,added_latency_ms=500``)
or through the admin API behind the bearer token:

- ``GET /admin/faults``: every fault;
- ``PUT /admin/faults/{adapter}`` with ``{"error_rate": 0.3, "added_latency_ms": 500}``;
- ``DELETE /admin/faults/{adapter}``.

A faulty adapter's requests first wait ``added_latency_ms``, then fail with ``status``
(default 500, ``{"error": {"code": "injected_fault"}}``) with probability ``error_rate``.
Injected answers are counted in the metrics like any other, which is the point.
"""

from __future__ import annotations

import asyncio
import random

from fastapi import APIRouter
from pydantic import BaseModel, Field, ValidationError

from lorafleet.errors import LorafleetError, first_problem
from lorafleet.serve.adapters import AdapterRejected, validate_name
from lorafleet.serve.admin import table_admin_router

__all__ = ["Fault", "FaultTable", "faults_admin_router", "parse_fault"]


class Fault(BaseModel):
    """What goes wrong for one adapter."""

    error_rate: float = Field(
        0.0, ge=0, le=1, description="share of requests answered with `status`"
    )
    added_latency_ms: float = Field(
        0.0, ge=0, le=600_000, description="delay added before every answer"
    )
    status: int = Field(500, ge=500, le=599, description="the HTTP status of an injected failure")


class FaultTable:
    """Faults by adapter name; changed only on the event loop, so no locking.

    Args:
        faults: the initial faults.
        seed: seed of the failure draws (tests); system randomness when ``None``.
    """

    def __init__(self, faults: dict[str, Fault] | None = None, seed: int | None = None) -> None:
        self._faults = dict(faults or {})
        self._rng = random.Random(seed)

    def get(self, adapter: str) -> Fault | None:
        """The fault set on an adapter, if any."""
        return self._faults.get(adapter)

    def set(self, adapter: str, fault: Fault) -> None:
        """Set or replace an adapter's fault."""
        self._faults[validate_name(adapter)] = fault

    def delete(self, adapter: str) -> None:
        """Clear an adapter's fault; raises ``KeyError`` if it has none."""
        del self._faults[adapter]

    def as_dict(self) -> dict[str, dict]:
        """Every fault, JSON-ready."""
        return {name: fault.model_dump() for name, fault in self._faults.items()}

    async def inject(self, adapter: str) -> int | None:
        """Apply an adapter's fault to one request: wait, then maybe fail.

        Returns:
            The status to answer with instead of a completion, or ``None`` to go on.
        """
        fault = self._faults.get(adapter)
        if fault is None:
            return None
        if fault.added_latency_ms:
            await asyncio.sleep(fault.added_latency_ms / 1000)
        return fault.status if self._rng.random() < fault.error_rate else None


def parse_fault(text: str) -> tuple[str, Fault]:
    """``NAME:error_rate=0.3,added_latency_ms=500`` -> (name, fault).

    Raises:
        LorafleetError: naming the option and what is wrong with it.
    """
    name, sep, settings = text.partition(":")
    try:
        validate_name(name)
        if not sep or not settings:
            raise ValueError("expected NAME:KEY=VALUE[,KEY=VALUE]")
        fields = {}
        for item in settings.split(","):
            key, eq, value = item.partition("=")
            if not eq or key.strip() not in Fault.model_fields:
                raise ValueError(f"{item!r}: keys are {', '.join(Fault.model_fields)}")
            fields[key.strip()] = value.strip()
        return name, Fault.model_validate(fields)
    except AdapterRejected as exc:
        raise LorafleetError(f"--fault {text!r}: {exc.detail}") from None
    except ValidationError as exc:
        raise LorafleetError(f"--fault {text!r}: {first_problem(exc, 'fault')}") from None
    except ValueError as exc:
        raise LorafleetError(f"--fault {text!r}: {exc}") from None


def faults_admin_router(table: FaultTable, token: str | None) -> APIRouter:
    """``GET /admin/faults`` and ``GET/PUT/DELETE /admin/faults/{adapter}`` behind the bearer token."""
    return table_admin_router(
        "faults",
        Fault,
        table,
        token,
        missing=lambda adapter: f"no fault on {adapter!r}",
        deleted=lambda adapter: {"adapter": adapter, "status": "cleared"},
    )
