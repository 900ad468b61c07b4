"""``lorafleet submit``: run the fleet pipeline on a Kubeflow Pipelines endpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorafleet.console import console

__all__ = ["submit"]


def submit(
    spec: Annotated[
        Path,
        typer.Argument(
            help="The fleet spec (YAML); its local data files are uploaded to the profile's "
            "storage.object_store first (or stage them with `lorafleet spec stage`)."
        ),
    ],
    host: Annotated[
        str,
        typer.Option(help="Kubeflow Pipelines API endpoint, e.g. http://ml-pipeline-ui.kubeflow."),
    ],
    profile: Annotated[
        str | None,
        typer.Option(help="Cluster profile of the spec's pipeline.profiles (aws, gcp, onprem)."),
    ] = None,
    namespace: Annotated[
        str | None, typer.Option(help="User namespace of a multi-user Kubeflow deployment.")
    ] = None,
    service_account: Annotated[
        str | None, typer.Option(help="ServiceAccount the run's pods use.")
    ] = None,
) -> None:
    """Compile the fleet pipeline (with --profile's Kubernetes settings), upload it and start a run.

    Local data files are staged first to the profile's object store (pipeline.profiles.P.storage.object_store), so the run reads them by URI; a local data file with no store to go to is refused before anything is sent."""
    from lorafleet.pipelines.submit import submit_fleet

    done = submit_fleet(
        spec, host, profile=profile, namespace=namespace, service_account=service_account
    )
    console.print(
        f"run {done.run_name} started: run {done.run_id}, pipeline {done.pipeline_id}, version {done.version_id}"
    )
