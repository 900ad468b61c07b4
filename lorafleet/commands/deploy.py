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
        help="Cluster profile: aws, gcp, onprem, or local (kind/minikube on this machine: "
        "local folders mounted by hostPath) (default: the spec's serving.profile).",
    ),
]
RegistryOpt = Annotated[
    str | None,
    typer.Option(
        "--registry",
        help="The registry naming the adapter versions: its folder (the one holding "
        "<expert>/versions/) or s3:// gs:// pvc:// URI (default: the spec's registry.uri).",
    ),
]


def _adapters(spec, registry: str | None) -> dict[str, str]:
    """The served versions, with the one-line fixes for a registry this machine cannot read."""
    from lorafleet.deploy.render import resolve_adapters
    from lorafleet.errors import LorafleetError, StorageError

    if registry and Path(registry).is_file():
        raise LorafleetError(
            f"--registry {registry}: a file; pass the registry's folder (the one holding "
            "<expert>/versions/v<N>.json) or its s3://, gs:// or pvc:// URI"
        )
    try:
        return resolve_adapters(spec, registry)
    except StorageError as exc:
        if registry:
            raise
        raise LorafleetError(
            f"registry.uri: {exc}; or pass --registry DIR, a local copy of the registry folder"
        ) from None


def _rendered(file: Path, profile: str | None, registry: str | None) -> list[dict]:
    from lorafleet.deploy.render import render, serving_problems, serving_warnings, trained_base
    from lorafleet.deploy.validate import validate_manifests
    from lorafleet.errors import LorafleetError
    from lorafleet.fleet import load_fleet

    spec = load_fleet(file, check_files=False)
    profile = profile or spec.serving.profile
    # What the spec alone decides comes first: no registry is read for a spec render refuses.
    problems = serving_problems(spec, profile)
    if problems:
        raise LorafleetError("\n".join(f"{field}: {message}" for field, message in problems))
    for field, message in serving_warnings(spec, profile):
        typer.echo(f"warning: {field}: {message}", err=True)
    adapters = _adapters(spec, registry)
    base = None
    if spec.base.model == "demo" and not spec.on_profile(profile).serving.base_uri:
        base = trained_base(spec, adapters, registry)
    objects = render(spec, profile, adapters, base)
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
    PodDisruptionBudget, NetworkPolicy and ServiceMonitor that serve the fleet.

    Adapter versions come from the registry (production, else the latest). Profile local
    renders for a kind or minikube cluster on this machine: the registry folder and a
    demo base (the folder the versions' lineage names) are mounted from the node by
    hostPath, so the node must see them at the same paths (docs/deployment.md)."""
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
