"""The fleet spec's field reference, generated from the models so that it cannot drift.

:func:`render_reference` walks :class:`~lorafleet.fleet.spec.FleetSpec` and every model
under it and writes one Markdown section per model: where it sits in the YAML, its
docstring, and a table of its fields (YAML key, type, default, constraints, description).
``lorafleet spec reference`` prints it; ``make docs`` rewrites
``docs/fleet-spec-reference.md`` with it, and a test fails when the two differ.
"""

from __future__ import annotations

import inspect
import json
import re
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from lorafleet.fleet.common import SLUG
from lorafleet.fleet.spec import FleetSpec

__all__ = ["REFERENCE_DOC", "render_reference", "undocumented_fields"]

REFERENCE_DOC = "docs/fleet-spec-reference.md"
"""Where the rendered reference is committed, relative to the repository root."""

_PATTERN_NAMES = {SLUG: "a DNS-1123 label (lower-case letters, digits, '-'; at most 63)"}

_INTRO = """\
# Fleet spec reference

<!-- Generated from the models in lorafleet/fleet/ by `lorafleet spec reference`.
     Do not edit: run `make docs` after changing a model. -->

Every field of the fleet spec, generated from its models (`lorafleet/fleet/`). The guide,
with examples and the rules that join several fields, is [fleet-spec.md](fleet-spec.md).

- A key in a section's table is written under the section's place in the YAML
  (`experts[]` is each item of the `experts` list, `*` any key of a mapping).
- Unknown keys are errors. A field with a default may be left out; **required** ones may not.
- `null` is YAML's null (`~`, or the key with no value).
- Besides the fields below, the top level may hold `expert_defaults`: a mapping of expert
  fields, deep-merged into every item of `experts` (an expert's own keys win).
"""


@dataclass
class _Section:
    """One model's section: the model and every place it appears in the spec."""

    model: type[BaseModel]
    paths: list[str] = field(default_factory=list)


def _fields(model: type[BaseModel]) -> list[tuple[str, Any]]:
    """Each field's name and resolved type (a model declared below the one that uses it
    is still a forward reference in ``model_fields``)."""
    hints = get_type_hints(model)
    return [(name, hints[name]) for name in model.model_fields]


def _key(model: type[BaseModel], name: str) -> str:
    """The field's key in YAML: its alias, if it has one."""
    return model.model_fields[name].alias or name


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """The models inside a field's type (``list[Toleration] | None`` -> ``Toleration``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in get_args(annotation):
        yield from _models_in(arg)


def _step(annotation: Any) -> str:
    """How the path goes on from a field into the models it holds: a list item is ``[]``,
    a mapping's value ``.*``."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return next((_step(a) for a in get_args(annotation) if any(_models_in(a))), "")
    if origin is list:
        return "[]" + _step(get_args(annotation)[0])
    if origin is dict:
        return ".*" + _step(get_args(annotation)[1])
    return ""


def _sections() -> list[_Section]:
    """Every model under :class:`FleetSpec`, in the order a reader meets them (depth
    first, fields in order), each with every path where it appears."""
    found: dict[type[BaseModel], _Section] = {}

    def visit(model: type[BaseModel], path: str) -> None:
        found.setdefault(model, _Section(model)).paths.append(path)
        for name, annotation in _fields(model):
            here = f"{path}.{_key(model, name)}" if path else _key(model, name)
            for inner in _models_in(annotation):
                visit(inner, here + _step(annotation))

    visit(FleetSpec, "")
    return list(found.values())


def _link(model: type[BaseModel]) -> str:
    """A link to the model's section (its heading is the class name)."""
    return f"[{model.__name__}](#{model.__name__.lower()})"


def _literal(values: tuple[Any, ...]) -> str:
    """Allowed values as code: ``local``, ``aws``."""
    return ", ".join(f"`{json.dumps(v)}`" if not isinstance(v, str) else f"`{v}`" for v in values)


def _type(annotation: Any) -> str:
    """A field's type in YAML's words: ``integer or null``, ``list[string]``,
    ``mapping (string → StepPlatform)``."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _link(annotation)
    if origin is Literal:
        kinds = {type(v) for v in args}
        return _type(kinds.pop()) if len(kinds) == 1 else "any"
    if origin in (Union, types.UnionType):
        # A literal among other types is written out; alone (or with null) its values are
        # the constraints column's "one of".
        alone = sum(a is not type(None) for a in args) == 1
        parts = [
            " or ".join(f'"{v}"' for v in get_args(a))
            if get_origin(a) is Literal and not alone
            else _type(a)
            for a in args
        ]
        return " or ".join(dict.fromkeys(parts))
    if origin is list:
        return f"list[{_type(args[0])}]"
    if origin is dict:
        return f"mapping ({_type(args[0])} → {_type(args[1])})"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    if annotation in names:
        return names[annotation]
    return getattr(annotation, "__name__", str(annotation))


def _allowed(annotation: Any) -> list[str]:
    """Allowed values of a field's literal parts: its own, or its mapping's keys."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Literal:
        return [f"one of {_literal(args)}"]
    if origin in (Union, types.UnionType):
        only = [a for a in args if a is not type(None)]
        return _allowed(only[0]) if len(only) == 1 else []
    if origin is dict and get_origin(args[0]) is Literal:
        return [f"keys: {_literal(get_args(args[0]))}"]
    return []


_BOUNDS = (
    ("ge", ">= {}"),
    ("gt", "> {}"),
    ("le", "<= {}"),
    ("lt", "< {}"),
    ("min_length", "at least {} long"),
    ("max_length", "at most {} long"),
)


def _constraints(info: FieldInfo, annotation: Any) -> str:
    """Bounds, lengths, patterns and allowed values, e.g. ``>= 1, <= 256``."""
    found = []
    for meta in info.metadata:  # annotated_types' Ge, MinLen ...; pydantic's pattern
        for attribute, form in _BOUNDS:
            if (bound := getattr(meta, attribute, None)) is not None:
                found.append(form.format(json.dumps(bound)))
        if pattern := getattr(meta, "pattern", None):
            found.append(_PATTERN_NAMES.get(pattern, f"matches `{pattern}`"))
    return ", ".join(found + _allowed(annotation))


def _default(info: FieldInfo) -> str:
    """The default as YAML would write it; a nested model's is its own fields' defaults."""
    if info.is_required():
        return "**required**"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "its defaults"
    return f"`{json.dumps(value, default=str)}`"


def _prose(text: str) -> str:
    """reST-ish docstring text as Markdown on one line of a table."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    return " ".join(text.split()).replace("|", "\\|")


def _summary(model: type[BaseModel]) -> str:
    """A model's docstring (its first paragraph, for a table cell)."""
    doc = inspect.getdoc(model) or ""
    return _prose(doc.split("\n\n")[0])


def _description(info: FieldInfo, annotation: Any) -> str:
    """The field's own description, else the summary of the model it holds."""
    if info.description:
        return _prose(info.description)
    models = list(_models_in(annotation))
    return _summary(models[0]) if models else ""


def undocumented_fields() -> list[str]:
    """``Model.field`` of every field that has no description and holds no model to borrow
    one from (its type and constraints are all the reference says)."""
    return [
        f"{section.model.__name__}.{name}"
        for section in _sections()
        for name, annotation in _fields(section.model)
        if not _description(section.model.model_fields[name], annotation)
    ]


def _render_section(section: _Section) -> str:
    """One model's heading, places, docstring and field table."""
    model = section.model
    paths = ", ".join(f"`{p}`" if p else "the top level" for p in section.paths)
    doc = inspect.getdoc(model) or ""
    rows = [
        "| key | type | default | constraints | description |",
        "|---|---|---|---|---|",
    ]
    for name, annotation in _fields(model):
        info = model.model_fields[name]
        cells = (
            f"`{_key(model, name)}`",
            _type(annotation),
            _default(info),
            _constraints(info, annotation),
            _description(info, annotation),
        )
        rows.append("| " + " | ".join(cells) + " |")
    parts = [
        f"## {model.__name__}",
        f"At: {paths}.",
        *(_prose(paragraph) for paragraph in doc.split("\n\n") if paragraph),
        "\n".join(rows),
    ]
    return "\n\n".join(parts) + "\n"


def render_reference() -> str:
    """The whole reference: an introduction, then one section per model.

    Returns:
        Markdown text ending in one newline.
    """
    sections = _sections()
    index = "\n".join(
        f"- {_link(s.model)}: " + ", ".join(f"`{p}`" if p else "top level" for p in s.paths)
        for s in sections
    )
    body = "\n".join(_render_section(s) for s in sections)
    return f"{_INTRO}\n## Contents\n\n{index}\n\n{body}"
