"""Read a fleet YAML file: merge ``expert_defaults``, validate, resolve local data paths, and
name the file, line and field of every mistake."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from pydantic import ValidationError

from lorafleet.errors import SpecError, validation_problems
from lorafleet.fleet.spec import DATA_FIELDS, FleetSpec, is_local_data
from lorafleet.fleet.tasks import TaskDefinition, known_task, unknown_task_message
from lorafleet.storage import parse_location

__all__ = ["load_fleet", "load_task", "spec_from_json", "spec_to_json"]


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def _locate(node: yaml.Node | None, loc: tuple) -> tuple[int | None, int]:
    """The line (1-based) of the deepest YAML node along ``loc``, and how deep it is."""
    line = node.start_mark.line + 1 if node is not None else None
    depth = 0
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
        else:
            node = None
        if node is None:
            break
        line, depth = node.start_mark.line + 1, depth + 1
    return line, depth


def _from_defaults(root: yaml.Node | None, loc: tuple) -> tuple[int | None, bool]:
    """Where ``loc`` is written, and whether that is in ``expert_defaults`` (an expert's
    field the expert does not write itself comes from there)."""
    line, depth = _locate(root, loc)
    if depth < len(loc) and len(loc) > 2 and loc[0] == "experts":
        d_line, d_depth = _locate(root, ("expert_defaults", *loc[2:]))
        if d_depth > max(1, depth - 2):
            return d_line, True
    return line, False


def _line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    """Where ``loc`` is written; an expert's field may come from ``expert_defaults``."""
    return _from_defaults(root, loc)[0]


def _shown_field(root: yaml.Node | None, loc: tuple) -> str:
    """The field as the user wrote it: ``expert_defaults.lora.r`` rather than
    ``experts.0.lora.r`` when the value came from the defaults."""
    if _from_defaults(root, loc)[1]:
        return ".".join(map(str, ("expert_defaults", *loc[2:])))
    return ".".join(map(str, loc)) or "spec"


def _read_yaml(path: Path) -> tuple[yaml.Node | None, object]:
    """A YAML file's node tree (for line numbers) and its data.

    Raises:
        SpecError: The file is missing, not UTF-8, or not YAML.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise SpecError(path, None, "file", "no such file") from None
    except UnicodeDecodeError:
        raise SpecError(path, None, "file", "not UTF-8 text") from None
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader), yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise SpecError(
            path, mark.line + 1 if mark else None, "yaml", str(getattr(exc, "problem", exc))
        ) from None


def _problems(exc: ValidationError, root: yaml.Node | None, prefix: tuple = ()) -> list[tuple]:
    """Every problem as ``(line, field, message)``, in the order they appear in the file."""
    found = []
    for loc, message in validation_problems(exc):
        found.append(
            (_line_of(root, (*prefix, *loc)), _shown_field(root, (*prefix, *loc)), message)
        )
    return sorted(dict.fromkeys(found), key=lambda p: (p[0] is None, p[0] or 0))


def load_task(path: str | Path) -> TaskDefinition:
    """Read one task definition from a YAML file.

    Raises:
        SpecError: naming the file, line and field of every mistake.
    """
    path = Path(path)
    root, raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError(path, 1, "task", "the top level must be a mapping")
    try:
        return TaskDefinition.model_validate(raw)
    except ValidationError as exc:
        (line, field, message), *more = _problems(exc, root)
        raise SpecError(path, line, field, message, more) from None


def _task_files(raw: dict, root: yaml.Node | None, path: Path) -> set[str]:
    """Replace each ``tasks:`` entry that names a file (relative to the spec) by its
    definition; return the names of the tasks the spec declares."""
    entries = raw.get("tasks")
    if not isinstance(entries, list):
        return set()
    declared = set()
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            file = path.resolve().parent / entry
            if not file.is_file():
                raise SpecError(
                    path, _line_of(root, ("tasks", i)), f"tasks.{i}", f"file not found: {entry}"
                )
            entries[i] = load_task(file)
            declared.add(entries[i].name)
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            declared.add(entry["name"])
    return declared


def load_fleet(path: str | Path, *, check_files: bool = True) -> FleetSpec:
    """Load, merge ``expert_defaults`` into each expert, validate, and resolve data paths.

    Args:
        path: the fleet YAML file.
        check_files: also require every expert's local data files (paths and ``file://``)
            to exist; files in a store are read, and checked, by the validate step.

    Returns:
        The validated spec. A data path is made absolute against the spec's folder; a
        URI (``s3://``, ``gs://``, ``pvc://``, ``file://``) is kept as written.

    Raises:
        SpecError: naming file, line and field, for any mistake.
    """
    path = Path(path)
    root, raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError(path, 1, "spec", "the top level must be a mapping")
    defaults = raw.pop("expert_defaults", None) or {}
    if not isinstance(defaults, dict):
        raise SpecError(
            path, _line_of(root, ("expert_defaults",)), "expert_defaults", "must be a mapping"
        )
    if isinstance(raw.get("experts"), list):
        raw["experts"] = [
            _deep_merge(defaults, e) if isinstance(e, dict) else e for e in raw["experts"]
        ]
    declared = _task_files(raw, root, path)
    experts = raw["experts"] if isinstance(raw.get("experts"), list) else []
    unknown = [  # named at the expert's line, not as a problem of the whole spec
        (loc, unknown_task_message(e["task"], dict.fromkeys(declared)))
        for loc, e in ((("experts", i, "task"), e) for i, e in enumerate(experts))
        if isinstance(e, dict)
        and isinstance(e.get("task"), str)
        and e["task"] not in declared
        and not known_task(e["task"])
    ]
    try:
        spec = FleetSpec.model_validate(raw)  # an unknown task fails it too, without a line
    except ValidationError as exc:
        found = [p for p in _problems(exc, root) if not p[2].startswith("unknown task ")]
        found += [(_line_of(root, loc), ".".join(map(str, loc)), m) for loc, m in unknown]
        # one problem a line, in the order they appear in the file
        found = sorted(dict.fromkeys(found), key=lambda p: (p[0] is None, p[0] or 0))
        (line, field, message), *more = found
        raise SpecError(path, line, field, message, more) from None
    folder = path.resolve().parent
    for i, e in enumerate(spec.experts):
        for attr in DATA_FIELDS:
            written = getattr(e, attr)
            if not is_local_data(written):
                continue  # in a store: read where the step runs, not checked here
            if "://" not in written:
                setattr(e, attr, str(folder / written))  # an absolute path stays as it is
            if check_files and not Path(parse_location(getattr(e, attr)).uri).is_file():
                raise SpecError(
                    path,
                    _line_of(root, ("experts", i, attr)),
                    f"experts.{i}.{attr}",
                    f"file not found: {written}",
                )
    reg = spec.registry.uri
    if "://" not in reg and not Path(reg).is_absolute():
        spec.registry.uri = str(folder / reg)
    return spec


def spec_to_json(spec: FleetSpec) -> str:
    """Serialize a loaded spec (absolute data paths or URIs) for pipeline parameters."""
    return spec.model_dump_json(by_alias=True)


def spec_from_json(text: str) -> FleetSpec:
    """The inverse of :func:`spec_to_json`."""
    return FleetSpec.model_validate_json(text)
