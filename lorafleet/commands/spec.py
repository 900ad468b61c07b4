"""``lorafleet spec``: check a fleet spec, and stage its data for runs on a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorafleet.console import console, out, write_json_result
from lorafleet.errors import SpecError

__all__ = ["app"]

app = typer.Typer(help="Check fleet specs and stage their data.", no_args_is_help=True)

SpecFile = Annotated[Path, typer.Argument(help="The fleet spec (YAML).")]


def _line_of(file: Path, field: str) -> int | None:
    """The line of ``field`` (``serving.storage.role_arn``) in the YAML file, or of the
    deepest part of it that is written there (a missing key: its parent mapping)."""
    import yaml

    node = yaml.compose(file.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    line = None
    for part in field.split("."):
        if not isinstance(node, yaml.MappingNode):
            break
        node = next((v for k, v in node.value if k.value == part), None)
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


def _served_profiles(spec) -> list[str]:
    """The profiles the spec says it is served on: ``serving.profile`` and every profile
    ``serving.profiles`` has settings for."""
    return list(dict.fromkeys([spec.serving.profile, *spec.serving.profiles]))


def _serving_error(file: Path, spec) -> SpecError | None:
    """What ``lorafleet deploy render`` would refuse in the spec's serving block, on each of
    :func:`_served_profiles`."""
    from lorafleet.deploy.render import serving_problems

    found = list(
        dict.fromkeys(
            (_line_of(file, field), field, message)
            for profile in _served_profiles(spec)
            for field, message in serving_problems(spec, profile)
        )
    )
    if not found:
        return None
    (line, field, message), *more = found
    return SpecError(file, line, field, message, more)


def _serving_warnings(file: Path, spec) -> list[dict]:
    """What ``lorafleet deploy render`` renders but warns about, each printed as one
    ``warning: FILE:LINE: field: message`` line on stderr."""
    from lorafleet.deploy.render import serving_warnings

    found = [
        {"file": str(file), "line": _line_of(file, field), "field": field, "message": message}
        for field, message in dict.fromkeys(
            w for profile in _served_profiles(spec) for w in serving_warnings(spec, profile)
        )
    ]
    for w in found:
        where = f"{w['file']}:{w['line']}" if w["line"] else w["file"]
        typer.echo(f"warning: {where}: {w['field']}: {w['message']}", err=True)
    return found


@app.command("check")
def check(
    file: SpecFile,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the result as a JSON object on stdout: ok, name, experts, and errors "
            "(file, line, field, message).",
        ),
    ] = False,
) -> None:
    """Validate a fleet spec, and that `lorafleet deploy render` accepts its serving block
    (profile, storage identity, storage URIs) on serving.profile and on every profile of
    serving.profiles; errors are printed as FILE:LINE: field.path:
    message, one a line, with exit code 2. Warnings (e.g. runtime vllm on CPUs) are printed
    as `warning: FILE:LINE: field.path: message` and do not fail the check."""
    from lorafleet.fleet import load_fleet

    spec = None
    try:
        spec = load_fleet(file)
        error = _serving_error(file, spec)
        if error:
            raise error
    except SpecError as exc:
        if as_json:
            errors = [(exc.line, exc.field, exc.message), *exc.more]
            write_json_result(
                "-",
                {
                    "ok": False,
                    "file": str(file),
                    "name": spec.name if spec else None,
                    "experts": [e.name for e in spec.experts] if spec else [],
                    "errors": [
                        {"file": exc.file, "line": line, "field": field, "message": message}
                        for line, field, message in errors
                    ],
                },
            )
        raise
    names = [e.name for e in spec.experts]
    warnings = _serving_warnings(file, spec)
    if as_json:
        write_json_result(
            "-",
            {
                "ok": True,
                "file": str(file),
                "name": spec.name,
                "experts": names,
                "errors": [],
                "warnings": warnings,
            },
        )
        return
    out.print(f"{file}: ok — fleet {spec.name!r}, {len(names)} experts: {', '.join(names)}")


@app.command("stage")
def stage(
    file: SpecFile,
    to: Annotated[
        str | None,
        typer.Option(
            help="Object store to upload the data to: s3://BUCKET/PREFIX, gs://BUCKET/PREFIX "
            "or pvc://CLAIM/PATH (default: --profile's storage.object_store)."
        ),
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(
            help="Cluster profile (aws, gcp, onprem) whose pipeline.profiles.P.storage names "
            "the store and its S3 endpoint."
        ),
    ] = None,
    out: Annotated[
        str,
        typer.Option("--out", "-o", help="Where the staged spec goes: a file, or - for stdout."),
    ] = "-",
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Write the spec_json run parameter (one line of JSON) instead of YAML."
        ),
    ] = False,
) -> None:
    """Upload the spec's local data files to an object store and write the spec that points there.

    Each file goes to <store>/data/sha256/<sha256>/<name>, once: a file already there is not uploaded again. The staged spec names those URIs and each file's digest (checked by the pipeline's validate step), so a run started in the Kubeflow Pipelines UI reads the same bytes. `lorafleet submit` does this itself when its profile names a store.
    """
    import yaml

    from lorafleet.errors import LorafleetError
    from lorafleet.fleet import load_fleet, spec_to_json
    from lorafleet.io import atomic_write_text
    from lorafleet.pipelines.platform import spec_profile
    from lorafleet.staging import stage_spec
    from lorafleet.storage import Storage

    spec = load_fleet(file)
    platform = spec_profile(file, profile) if profile else None
    store = to or (platform.storage.object_store if platform else None)
    if store is None:
        raise LorafleetError(
            f"--to URI is needed: profile {profile} has no pipeline.profiles.{profile}.storage.object_store"
            if profile
            else "--to URI is needed (or --profile P, to use pipeline.profiles.P.storage.object_store)"
        )
    storage = Storage(s3_endpoint_url=platform.storage.endpoint if platform else None)
    done = stage_spec(spec, store, storage, source=file)
    if as_json:
        text = spec_to_json(done.spec) + "\n"
    else:
        # Defaults left out: what is written reads back as the same spec, and stays short.
        short = done.spec.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        text = yaml.safe_dump(
            {"apiVersion": done.spec.api_version, **short}, sort_keys=False, allow_unicode=True
        )
    if out == "-":
        typer.echo(text, nl=False)
    else:
        atomic_write_text(out, text)
    console.print(
        f"staged {len(done.uploaded) + len(done.present)} data files in {store}: "
        f"{len(done.uploaded)} uploaded, {len(done.present)} already there"
        + ("" if out == "-" else f"; wrote {out}")
    )


@app.command("reference")
def reference(
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Where the Markdown goes: a file, or - for stdout "
            "(`make docs` writes docs/fleet-spec-reference.md).",
        ),
    ] = "-",
) -> None:
    """Print the field reference of the fleet spec as Markdown: every field of every part,
    with its type, default, constraints and description, generated from the spec's models."""
    from lorafleet.fleet.reference import render_reference
    from lorafleet.io import atomic_write_text

    text = render_reference()
    if out == "-":
        typer.echo(text, nl=False)
    else:
        atomic_write_text(out, text)
        console.print(f"wrote {out}")
