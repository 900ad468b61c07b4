"""Property tests: whatever a fleet YAML file holds, :func:`lorafleet.fleet.load_fleet` gives a
spec or a :class:`SpecError` whose every line is ``FILE:LINE: field: message`` or
``FILE: field: message`` — never another exception, never a traceback.

Documents are a valid spec (the shape of ``examples/fleet.yaml``, trimmed) with one to three
mutations: a value anywhere replaced by another of any YAML type, a key dropped, an
unknown key added; plus arbitrary YAML documents and text cut or spliced at random places
(broken YAML). Seeded (``derandomize``) so a failure reproduces; about 10 s on two cores.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafleet.errors import SpecError
from lorafleet.fleet import FleetSpec, load_fleet

VALID: dict[str, Any] = {
    "apiVersion": "lorafleet/v1",
    "name": "fuzz-fleet",
    "base": {"model": "demo", "demo": {"vocab_size": 512, "hidden_size": 64, "num_layers": 2}},
    "expert_defaults": {
        "synthesis": {"generator": "programmatic", "per_seed": 2},
        "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
        "training": {"epochs": 1, "learning_rate": 0.001, "batch_size": 4},
        "gate": {"max_loss_ratio": 0.98},
    },
    "experts": [
        {
            "name": "proposal-writer",
            "task": "proposal-writer",
            "seed_data": "data/seed.jsonl",
            "eval_data": "data/eval.jsonl",
        },
        {
            "name": "job-analyzer",
            "task": "job-analyzer",
            "seed_data": "data/seed.jsonl",
            "eval_data": "s3://bucket/eval.jsonl",
            "lora": {"r": 4},
        },
    ],
    "serving": {"runtime": "lorafleet", "profile": "local", "max_batch_size": 8},
    "canary": {"steps": [10, 50, 100], "pause_seconds": 60},
    "registry": {"uri": "registry"},
}

# Any value YAML can hold (and a few strings a spec's fields take), nested a little.
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["demo", "all-linear", "s3://b/k", "pvc://x//etc", "../up", "", "~", "1e3"])
)
_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value in a document (the root's children first)."""
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else []
    )
    found = []
    for key, child in items:
        found.append((*prefix, key))
        found += _paths(child, (*prefix, key))
    return found


@st.composite
def _mutated(draw: st.DrawFn) -> Any:
    """The valid spec with one to three mutations."""
    doc = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        if not paths:
            break
        *parent_path, key = draw(st.sampled_from(paths))
        parent = doc
        for step in parent_path:
            parent = parent[step]
        kind = draw(st.sampled_from(["replace", "drop", "add"]))
        if kind == "replace":
            parent[key] = draw(_values)
        elif kind == "drop":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(_values)
        else:
            parent.append(draw(_values))
    return doc


def _dump(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


@st.composite
def _broken_text(draw: st.DrawFn) -> str:
    """The valid spec's text cut short, or with text spliced in: often not YAML at all."""
    text = _dump(VALID)
    at = draw(st.integers(0, len(text)))
    if draw(st.booleans()):
        return text[:at]
    junk = draw(st.text(alphabet=st.sampled_from(list(":-[]{}#&*!|>'\"%@`\t\n ,?x1")), max_size=6))
    return text[:at] + junk + text[at:]


_documents = _mutated().map(_dump) | _values.map(_dump) | _broken_text() | st.text(max_size=60)


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the data files the valid spec names."""
    root = tmp_path_factory.mktemp("fleet-fuzz")
    (root / "data").mkdir()
    for name in ("seed.jsonl", "eval.jsonl"):
        (root / "data" / name).write_text("")
    return root


def _error_lines_are_well_formed(error: SpecError, path: Path) -> None:
    form = re.compile(rf"{re.escape(str(path))}(:[1-9][0-9]*)?: [^\n]+?: [^\n]*\S[^\n]*")
    text = str(error)
    assert "Traceback" not in text
    lines = text.split("\n")
    assert len(lines) == 1 + len(error.more)
    for line in lines:
        assert form.fullmatch(line), line


def test_the_valid_document_loads(spec_dir: Path) -> None:
    path = spec_dir / "fleet.yaml"
    path.write_text(_dump(VALID), encoding="utf-8")
    assert isinstance(load_fleet(path), FleetSpec)


@settings(
    max_examples=600,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=_documents)
def test_any_document_loads_or_is_one_spec_error_line_per_problem(
    spec_dir: Path, text: str
) -> None:
    path = spec_dir / "fleet.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        spec = load_fleet(path)
    except SpecError as error:
        _error_lines_are_well_formed(error, path)
    else:
        assert isinstance(spec, FleetSpec)
