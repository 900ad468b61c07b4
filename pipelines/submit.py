"""Upload the compiled fleet pipeline to a Kubeflow Pipelines endpoint and start a run.

The pipeline is compiled fresh (with a profile's Kubernetes settings when one is named) and
uploaded under ``lorafleet-fleet[-PROFILE]``: as a new pipeline the first time, as a new
version of it afterwards. The run gets the spec (as JSON) and every expert's name as its
parameters, exactly as a run started in the KFP UI would.

The run's pods cannot read the submitting machine's disk: when the profile names an object
store (``pipeline.profiles.<P>.storage.object_store``) every local data file is staged there
first (:func:`~lorafleet.staging.stage_spec`), so the spec the run gets carries only URIs and
digests; a local data path with no store to stage it to is refused before anything is sent.
"""

from __future__ import annotations

import logging
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from lorafleet.errors import LorafleetError, SpecError
from lorafleet.fleet import FleetSpec, PlatformProfile, load_fleet, spec_to_json
from lorafleet.local import new_run_id
from lorafleet.pipelines.compile import compile_fleet
from lorafleet.pipelines.platform import spec_profile
from lorafleet.staging import local_data, stage_spec
from lorafleet.storage import Storage

__all__ = ["CONNECT_TIMEOUT_S", "Submission", "check_reachable", "cluster_spec", "submit_fleet"]

CONNECT_TIMEOUT_S = 5.0
"""How long a KFP endpoint has to accept a connection before ``submit`` gives up on it."""


@dataclass(frozen=True)
class Submission:
    """What :func:`submit_fleet` created on the endpoint."""

    pipeline_id: str
    version_id: str
    run_id: str
    run_name: str


def cluster_spec(
    spec: FleetSpec, spec_path: str | Path, profile: str | None, platform: PlatformProfile | None
) -> FleetSpec:
    """``spec`` as the cluster's pods can read it: local data staged to the profile's store.

    Args:
        spec: the loaded spec.
        spec_path: its file (named in errors).
        profile: the cluster profile's name, or None.
        platform: that profile's settings, or None.

    Returns:
        The spec with every local data file replaced by its URI and digest in the profile's
        object store; ``spec`` itself when it has no local data.

    Raises:
        SpecError: naming the first local data field when there is no store to stage it to.
        StorageError: if an upload fails.
    """
    local = next(local_data(spec), None)
    if local is None:
        return spec
    if platform is None or platform.storage.object_store is None:
        i, attr, written = local
        where = (
            f"set pipeline.profiles.{profile}.storage.object_store"
            if profile
            else "pass --profile P whose pipeline.profiles.P.storage.object_store names a store"
        )
        raise SpecError(
            spec_path,
            None,
            f"experts.{i}.{attr}",
            f"{written} is on this machine, not where the pipeline's pods can read it: "
            f"{where} to upload it there, or stage the data first (lorafleet spec stage)",
        )
    storage = Storage(s3_endpoint_url=platform.storage.endpoint)
    return stage_spec(spec, platform.storage.object_store, storage, source=spec_path).spec


def check_reachable(host: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast, in one line, when nothing accepts a connection at ``host``.

    ``kfp.Client`` retries a refused or silent endpoint for minutes and logs each retry;
    a plain TCP connect answers in ``timeout_s`` at most and sends no request.

    Args:
        host: the endpoint URL (``http://`` is assumed without a scheme).
        timeout_s: seconds to wait for the connection.

    Raises:
        LorafleetError: ``HOST: cannot reach Kubeflow Pipelines: REASON``.
    """
    url = urlsplit(host if "://" in host else f"http://{host}")
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        raise LorafleetError(f"--host {host}: not a valid URL (bad port)") from None
    if not url.hostname:
        raise LorafleetError(f"--host {host}: not a valid URL (no host name)")
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        if isinstance(exc, socket.gaierror):
            reason = f"host name {url.hostname} not found"
        elif isinstance(exc, TimeoutError | socket.timeout):
            reason = f"no answer from port {port} in {timeout_s:g} s"
        elif isinstance(exc, ConnectionRefusedError):
            reason = f"connection to port {port} refused"
        else:
            reason = exc.strerror or str(exc)
        raise LorafleetError(f"{host}: cannot reach Kubeflow Pipelines: {reason}") from None


def submit_fleet(
    spec_path: str | Path,
    host: str,
    profile: str | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
) -> Submission:
    """Compile, upload and run the fleet pipeline of ``spec_path`` on ``host``.

    Args:
        spec_path: the fleet spec; its local data files are staged to the profile's store.
        host: the Kubeflow Pipelines API endpoint, e.g. ``http://ml-pipeline-ui.kubeflow``.
        profile: a cluster profile of the spec's ``pipeline.profiles`` (``None``: no settings).
        namespace: the user namespace of a multi-user deployment.
        service_account: the Kubernetes ServiceAccount the run's pods use.

    Returns:
        The pipeline, version and run ids.

    Raises:
        LorafleetError: if the spec or profile is wrong, a local data file has no store to be
            staged to (see :func:`cluster_spec`), or the endpoint is unreachable
            (:func:`check_reachable`, checked before anything is staged), refuses or fails.
    """
    import kfp
    from kfp_server_api.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    spec = load_fleet(spec_path, check_files=False)
    platform = spec_profile(spec_path, profile) if profile else None
    check_reachable(host)
    spec = cluster_spec(spec, spec_path, profile, platform)
    # A connection lost later fails below in one line: no retry warning per attempt.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    name = f"lorafleet-fleet-{profile}" if profile else "lorafleet-fleet"
    stamp = new_run_id()
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            # kfp.Client warns on every construction that it needs a v2 backend: we know.
            warnings.simplefilter("ignore", FutureWarning)
            package = str(compile_fleet(Path(tmp) / f"{name}.yaml", platform))
            # kfp.Client logs a traceback per failed healthz try before it gives up itself.
            logging.disable(logging.ERROR)
            try:
                client = kfp.Client(host=host, namespace=namespace or "kubeflow")
            finally:
                logging.disable(logging.NOTSET)
            pipeline_id = client.get_pipeline_id(name)
            if pipeline_id is None:
                pipeline_id = client.upload_pipeline(
                    package, pipeline_name=name, namespace=namespace
                ).pipeline_id
                versions = client.list_pipeline_versions(
                    pipeline_id, sort_by="created_at desc", page_size=1
                )
                if not versions.pipeline_versions:
                    raise LorafleetError(
                        f"{host}: pipeline {name} ({pipeline_id}) was uploaded but has no version"
                    )
                version_id = versions.pipeline_versions[0].pipeline_version_id
            else:
                version_id = client.upload_pipeline_version(
                    package, f"{name}-{stamp}", pipeline_id=pipeline_id
                ).pipeline_version_id
            run_name = f"{spec.name}-{stamp}"
            run = client.run_pipeline(
                experiment_id=None,
                job_name=run_name,
                pipeline_id=pipeline_id,
                version_id=version_id,
                params={"spec_json": spec_to_json(spec), "experts": [e.name for e in spec.experts]},
                service_account=service_account,
            )
    except ApiException as exc:
        raise LorafleetError(
            f"{host}: Kubeflow Pipelines answered {exc.status} {exc.reason}: {str(exc.body)[:200]}"
        ) from None
    except TimeoutError:  # kfp.Client: healthz never answered 200
        raise LorafleetError(
            f"{host}: not a Kubeflow Pipelines API ({host.rstrip('/')}/apis/v2beta1/healthz "
            "does not answer)"
        ) from None
    except HTTPError as exc:
        # MaxRetryError carries the last attempt's error; its text names the pool, not why.
        reason = getattr(exc, "reason", None) or exc
        raise LorafleetError(
            f"{host}: cannot reach Kubeflow Pipelines: {str(reason).rpartition(': ')[2] or type(reason).__name__}"
        ) from None
    return Submission(
        pipeline_id=pipeline_id, version_id=version_id, run_id=run.run_id, run_name=run_name
    )
