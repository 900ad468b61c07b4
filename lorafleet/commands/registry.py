"""``lorafleet registry``: list, show, promote and prune the adapter versions of a registry.

The registry is the spec's ``registry.uri`` (``--spec SPEC``) or any location given with
``--registry URI``: a folder, ``file://``, ``s3://``, ``gs://`` or ``pvc://``. Credentials
and endpoints come from the environment, as for every storage location (docs/storage.md).
See docs/registry.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lorafleet.console import console, out
from lorafleet.errors import LorafleetError
from lorafleet.registry import Registry

__all__ = ["app"]

app = typer.Typer(
    help="Inspect and steer the adapter registry: list versions, show one, move production, prune.",
    no_args_is_help=True,
)

SpecOpt = Annotated[
    Path | None, typer.Option("--spec", help="A fleet spec (YAML): use its registry.uri.")
]
RegistryOpt = Annotated[
    str | None,
    typer.Option(
        "--registry", help="The registry's location: a folder or s3:// gs:// pvc:// file:// URI."
    ),
]
Expert = Annotated[str, typer.Argument(help="The expert's name.")]


def _open(spec: Path | None, registry: str | None) -> Registry:
    """The registry named by exactly one of ``--spec`` and ``--registry``."""
    if (spec is None) == (registry is None):
        raise LorafleetError("name the registry with one of --spec SPEC or --registry URI")
    if registry is not None:
        return Registry(registry)
    from lorafleet.fleet import load_fleet

    return Registry(load_fleet(spec, check_files=False).registry.uri)


def _role(entry: dict, production: str | None) -> str:
    if entry["version"] == production:
        return "production"
    return "was production" if entry.get("production_since") else ""


@app.command("list")
def list_cmd(
    expert: Annotated[
        str | None, typer.Argument(help="Only this expert (default: every expert).")
    ] = None,
    spec: SpecOpt = None,
    registry: RegistryOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """List the registered versions of every expert (or one), and which is production."""
    from rich.table import Table

    reg = _open(spec, registry)
    listing = {}
    for name in [expert] if expert else reg.experts():
        pointer = reg.pointer(name)
        listing[name] = {
            "production": pointer["version"] if pointer else None,
            "versions": reg.versions(name),
        }
    if as_json:
        typer.echo(json.dumps({"registry": reg.uri, "experts": listing}, indent=2))
        return
    if not any(x["versions"] for x in listing.values()):
        console.print(f"registry {reg.uri}: no registered versions")
        return
    table = Table("expert", "version", "registered", "base", "role", title=f"registry {reg.uri}")
    for name, x in listing.items():
        for entry in x["versions"]:
            table.add_row(
                name,
                entry["version"],
                entry.get("registered_at") or "-",
                (entry.get("base_fingerprint") or "-")[:12],
                _role(entry, x["production"]),
            )
    out.print(table)


@app.command("show")
def show_cmd(
    expert: Expert,
    version: Annotated[
        str | None,
        typer.Argument(help="The version, e.g. v3 (default: production, else the latest)."),
    ] = None,
    spec: SpecOpt = None,
    registry: RegistryOpt = None,
) -> None:
    """Print a version's record and lineage (fingerprints, metrics, file digests) as JSON."""
    reg = _open(spec, registry)
    pointer = reg.pointer(expert)
    if version is None:
        entry = reg.production(expert) or reg.latest(expert)
        if entry is None:
            raise LorafleetError(f"registry {reg.uri}: {expert} has no registered version")
        version = entry["version"]
    record = reg.record(expert, version)
    ready = record["state"] == "ready"
    shown = {
        "uri": reg.version_uri(expert, version),
        "production": bool(pointer and pointer["version"] == version),
        "record": record,
        "lineage": reg.lineage(expert, version) if ready else None,
    }
    typer.echo(json.dumps(shown, indent=2))


@app.command("promote")
def promote_cmd(
    expert: Expert,
    version: Annotated[str, typer.Argument(help="The version to serve as production, e.g. v3.")],
    expect: Annotated[
        str | None,
        typer.Option(
            "--expect",
            help="Move only if production is still this version (a concurrent change is refused).",
        ),
    ] = None,
    spec: SpecOpt = None,
    registry: RegistryOpt = None,
) -> None:
    """Make a registered version the expert's production version (compare-and-swap).

    The operator's step when a rollout was promoted by a controller that cannot write the
    registry (its status says so), or to go back to an earlier version.
    """
    reg = _open(spec, registry)
    before = reg.pointer(expert)
    reg.set_production(expert, version, expected=expect if expect is not None else ...)
    was = before["version"] if before else "unset"
    console.print(f"{expert}: production {was} -> {version} ({reg.uri})")


@app.command("prune")
def prune_cmd(
    expert: Expert,
    keep: Annotated[
        int,
        typer.Option(
            "--keep",
            help="Keep this many of the newest versions; production and former production "
            "versions are always kept.",
        ),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only print what would be removed.")
    ] = False,
    spec: SpecOpt = None,
    registry: RegistryOpt = None,
) -> None:
    """Delete old versions' files (their records stay, so numbers are never reused)."""
    reg = _open(spec, registry)
    gone = reg.prune(expert, keep, dry_run=dry_run)
    if not gone:
        console.print(f"{expert}: nothing to prune ({reg.uri})")
        return
    verb = "would prune" if dry_run else "pruned"
    console.print(f"{expert}: {verb} {', '.join(gone)} ({reg.uri})")
