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
    token_file: Annotated[
        Path | None,
        typer.Option(
            help="File holding the bearer token for the pipelines API (default: in a Kubeflow "
            "pod the projected token /var/run/secrets/kubeflow/pipelines/token, else the "
            "kubeconfig's current user's token, if it has one)."
        ),
    ] = None,
    token_env: Annotated[
        str | None,
        typer.Option(help="Environment variable holding the bearer token, e.g. KFP_TOKEN."),
    ] = None,
    ca_cert: Annotated[
        Path | None,
        typer.Option(help="CA bundle (PEM) that signs the endpoint's TLS certificate."),
    ] = None,
    experiment: Annotated[
        str | None,
        typer.Option(
            help="Experiment of the run, created when missing (default: the fleet's name)."
        ),
    ] = None,
    run_name: Annotated[
        str | None,
        typer.Option(help="Display name of the run (default: <fleet name>-<UTC time>)."),
    ] = None,
    image: Annotated[
        str | None,
        typer.Option(
            help="Component image of every step, best pinned by digest "
            "(REGISTRY/PATH@sha256:...; default: the release image)."
        ),
    ] = None,
) -> None:
    """Compile the fleet pipeline (with --profile's Kubernetes settings), upload it and start a run.

    Local data files are staged first to the profile's object store (pipeline.profiles.P.storage.object_store), so the run reads them by URI; a local data file with no store to go to is refused before anything is sent. On a multi-user Kubeflow pass --namespace and a token (--token-file or --token-env; with neither, the in-pod pipelines token or the kubeconfig's current user's token is sent); the pipeline, experiment and run are then the namespace's own. A backend older than Kubeflow Pipelines 2.14 is refused before anything is uploaded."""
    from lorafleet.pipelines.submit import kfp_auth, submit_fleet

    done = submit_fleet(
        spec,
        host,
        profile=profile,
        namespace=namespace,
        service_account=service_account,
        auth=kfp_auth(token_file, token_env, ca_cert),
        experiment=experiment,
        run_name=run_name,
        image=image,
    )
    console.print(
        f"run {done.run_name} started: run {done.run_id}, pipeline {done.pipeline_id}, "
        f"version {done.version_id}, experiment {done.experiment_id}"
    )
