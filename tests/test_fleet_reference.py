"""The generated field reference of the fleet spec (lorafleet/fleet/reference.py).

The committed docs/fleet-spec-reference.md is a golden file: this test fails when it differs
from what the models generate, and only `make docs` rewrites it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
from pydantic import BaseModel

from lorafleet.fleet import FleetSpec
from lorafleet.fleet.reference import REFERENCE_DOC, render_reference, undocumented_fields

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference() -> str:
    return render_reference()


def _section(reference: str, model: str) -> str:
    """The text of one model's section."""
    match = re.search(rf"^## {model}\n(.*?)(?=^## |\Z)", reference, re.S | re.M)
    assert match, f"no section for {model}"
    return match.group(1)


def _row(reference: str, model: str, key: str) -> list[str]:
    """The cells of one field's row: key, type, default, constraints, description."""
    for line in _section(reference, model).splitlines():
        if line.startswith(f"| `{key}` |"):
            return [cell.strip() for cell in line.strip("|").split(" | ")]
    raise AssertionError(f"no row for {model}.{key}")


def test_committed_reference_is_current(reference: str) -> None:
    committed = ROOT / REFERENCE_DOC
    assert committed.is_file(), f"{REFERENCE_DOC} is missing: run `make docs`"
    assert committed.read_text(encoding="utf-8") == reference, (
        f"{REFERENCE_DOC} differs from the spec's models: run `make docs`"
    )


def test_fleet_spec_guide_links_the_reference() -> None:
    guide = (ROOT / "docs/fleet-spec.md").read_text(encoding="utf-8")
    assert "(fleet-spec-reference.md)" in guide


@pytest.mark.parametrize(
    "path",
    [
        "serving.storage",
        "serving.autoscaling",
        "serving.tolerations[]",
        "pipeline",
        "pipeline.profiles.*.storage",
        "tasks[]",
        "tasks[].metrics[]",
        "tasks[].safety.cases[]",
        "experts[].training.cluster.volume",
        "canary.analysis.judge",
    ],
)
def test_every_nested_block_has_a_section_naming_its_place(reference: str, path: str) -> None:
    contents = reference.split("## Contents", 1)[1].split("\n## ", 1)[0]
    assert f"`{path}`" in contents


@pytest.mark.parametrize(
    ("model", "key"),
    [
        ("ServingSpec", "namespace"),
        ("ServingSpec", "base_uri"),
        ("ServingSpec", "storage"),
        ("ServingSpec", "autoscaling"),
        ("ServingSpec", "router"),
        ("ServingSpec", "node_selector"),
        ("ServingSpec", "tolerations"),
        ("ServingSpec", "canary_traffic_percent"),
        ("FleetSpec", "pipeline"),
        ("TaskDefinition", "metrics"),
    ],
)
def test_fields_the_guide_left_out_are_documented(reference: str, model: str, key: str) -> None:
    assert len(_row(reference, model, key)) == 5


def test_every_field_of_every_model_has_a_row(reference: str) -> None:
    # Given every model reachable from FleetSpec (the reference's own walk is not trusted)
    seen: set[type] = set()
    todo: list[type] = [FleetSpec]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            # Then each field is a row under its YAML key
            _row(reference, model.__name__, info.alias or name)
            todo.extend(_nested(model, name))
    assert len(seen) > 20  # the walk found the parts, not just the top level


def _nested(model: type, name: str) -> list[type]:
    """The models a field holds."""

    def walk(annotation: object) -> list[type]:
        own = (
            [annotation]
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else []
        )
        return own + [m for arg in get_args(annotation) for m in walk(arg)]

    return walk(get_type_hints(model)[name])


@pytest.mark.parametrize(
    ("model", "key", "cells"),
    [
        # type, default and constraints come from the models (lorafleet/fleet/*.py)
        ("LoraSettings", "r", ["integer", "`8`", ">= 1, <= 256"]),
        ("FleetSpec", "apiVersion", ["string", '`"lorafleet/v1"`', "one of `lorafleet/v1`"]),
        ("FleetSpec", "experts", ["list[[ExpertSpec](#expertspec)]", "**required**", "at least 1 long"]),
        ("ServingSpec", "canary_traffic_percent", ["integer or null", "`null`", ">= 0, <= 100"]),
        ("Toleration", "effect", ["string or null", "`null`", "one of `NoSchedule`, `PreferNoSchedule`, `NoExecute`"]),
        ("LoraSettings", "target_modules", ['list[string] or "all-linear"', '`["q_proj", "k_proj", "v_proj", "o_proj"]`', ""]),
        ("PipelineSpec", "profiles", ["mapping (string → [PlatformProfile](#platformprofile))", "`{}`", "keys: `aws`, `gcp`, `onprem`"]),
        ("AnswerSpec", "schema", ["mapping (string → any) or null", "`null`", ""]),
    ],
)  # fmt: skip
def test_type_default_and_constraints(reference: str, model: str, key: str, cells: list) -> None:
    assert _row(reference, model, key)[1:4] == cells


def test_descriptions_come_from_fields_else_the_nested_models_docstring(reference: str) -> None:
    assert _row(reference, "ServingSpec", "base_uri")[4].startswith("storage URI of the base")
    # serving.storage has no description of its own: its model's docstring stands in
    assert _row(reference, "ServingSpec", "storage")[4].startswith("Cluster identity and storage")
    assert "ServingSpec.storage" not in undocumented_fields()


def test_docstring_markup_reads_as_markdown(reference: str) -> None:
    text = _section(reference, "ProfileStorage")
    assert "`lorafleet submit`" in text and "``" not in text and ":mod:" not in text


def test_cli_prints_and_writes_the_reference(
    lorafleet_cli: Callable, tmp_path: Path, reference: str
) -> None:
    printed = lorafleet_cli("spec", "reference", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == reference
    written = lorafleet_cli("spec", "reference", "--out", "ref.md", cwd=tmp_path)
    assert written.returncode == 0, written.stderr
    assert (tmp_path / "ref.md").read_text(encoding="utf-8") == reference
    assert "wrote ref.md" in written.stderr
