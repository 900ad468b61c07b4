"""The shipped task definitions and safety case sets: YAML files in ``catalog/``.

An expert whose ``task`` is not declared in its fleet spec gets the shipped definition of
that name. Adding a file here ships a task; no code names them.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

__all__ = ["CATALOG", "case_set", "case_sets", "shipped_task", "shipped_tasks"]

CATALOG = Path(__file__).resolve().parent / "catalog"


def shipped_tasks() -> list[str]:
    """The names of the shipped task definitions."""
    return sorted(p.stem for p in CATALOG.glob("*.yaml"))


@cache
def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def shipped_task(name: str) -> dict:
    """The raw definition of a shipped task (a fresh copy).

    Raises:
        KeyError: No shipped task has that name.
    """
    path = CATALOG / f"{name}.yaml"
    if name not in shipped_tasks():
        raise KeyError(name)
    return {**_load(path)}


def case_sets() -> list[str]:
    """The names of the shipped safety case sets."""
    return sorted(p.stem for p in (CATALOG / "safety").glob("*.yaml"))


def case_set(name: str) -> list[dict]:
    """The raw cases of a shipped safety case set.

    Raises:
        KeyError: No shipped case set has that name.
    """
    if name not in case_sets():
        raise KeyError(name)
    return [dict(c) for c in _load(CATALOG / "safety" / f"{name}.yaml")]
