"""``lorafleet deploy``: render the fleet's KServe objects for a cluster profile, or apply them.

Objects are built from the typed kubernetes/kserve models (:mod:`lorafleet.deploy.render`)
and validated offline before they are written or sent (:mod:`lorafleet.deploy.validate`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorafleet.console import console

app = typer.Typer(
    help="Render and apply the fleet's serving objects (KServe) for a cluster.",
    no_args_is_help=True,
)

SpecArg = Annotated[Path, typer.Argument(help="The fleet spec (YAML).")]
ProfileOpt = Annotated[
    str | None,
    typer.Option(
        "--profile",
        help="Cluster profile: aws, gcp or onprem (default: the spec's serving.profile).",
    ),
]
RegistryOpt = Annotated[
    str | None,
    typer.Option(
        "--registry",
        help="The registry naming the adapter versions: a folder or s3:// gs:// pvc:// URI "
        "(default: the spec's registry.uri).",
    ),
]


def _rendered(file: Path, profile: str | None, registry: str | None) -> list[dict]:
    from lorafleet.deploy.render import render, resolve_adapters
    from lorafleet.deploy.validate import validate_manifests
    from lorafleet.fleet import load_fleet

    spec = load_fleet(file, check_files=False)
    profile = profile or spec.serving.profile
    objects = render(spec, profile, resolve_adapters(spec, registry))
    report = validate_manifests(objects, f"deploy render {profile}")
    if report.note:
        console.print(f"note: {report.note}")
    return objects


@app.command("render")
def render_cmd(
    file: SpecArg,
    profile: ProfileOpt = None,
    registry: RegistryOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("-o", "--out", help="Write one YAML file per object here (default: stdout)."),
    ] = None,
) -> None:
    """Render and validate the ServiceAccounts, RBAC, ServingRuntime, InferenceService,
    PodDisruptionBudget, NetworkPolicy and ServiceMonitor that serve the fleet."""
    from lorafleet.deploy.render import dump_yaml, write_objects

    objects = _rendered(file, profile, registry)
    if out is None:
        typer.echo(dump_yaml(objects), nl=False)
        return
    for path in write_objects(objects, out):
        console.print(f"wrote {path}")


@app.command("apply")
def apply_cmd(
    file: SpecArg,
    profile: ProfileOpt = None,
    registry: RegistryOpt = None,
    timeout: Annotated[
        float,
        typer.Option(help="Seconds to wait for the InferenceService to be Ready (0: do not wait)."),
    ] = 900,
    kubeconfig: Annotated[
        Path | None,
        typer.Option(help="Kubeconfig file (default: $KUBECONFIG, ~/.kube/config or in-cluster)."),
    ] = None,
) -> None:
    """Apply the rendered objects idempotently (create, or merge-patch what differs) and
    wait until KServe reports the InferenceService Ready."""
    from lorafleet.deploy.apply import apply_objects, wait_ready
    from lorafleet.kube import kube_api

    objects = _rendered(file, profile, registry)
    with kube_api(kubeconfig) as api:
        for result in apply_objects(api, objects):
            console.print(f"{result.kind}/{result.name}: {result.action}")
        if timeout > 0:
            isvc = next(o for o in objects if o["kind"] == "InferenceService")
            with console.status(
                f"waiting for InferenceService/{isvc['metadata']['name']} to be Ready"
            ) as status:
                wait_ready(
                    api, isvc, timeout, on_poll=lambda s: status.update(f"InferenceService: {s}")
                )
            console.print(f"InferenceService/{isvc['metadata']['name']}: Ready")
