"""Upload the compiled fleet pipeline to a Kubeflow Pipelines endpoint and start a run.

The pipeline is compiled fresh (with a profile's Kubernetes settings when one is named) and
uploaded under ``lorafleet-fleet[-PROFILE]`` in the run's namespace: as a new pipeline the
first time, as a new version of it afterwards. The run gets the spec (as JSON) and every
expert's name as its parameters, exactly as a run started in the KFP UI would, and belongs
to an experiment (found by name, created when missing), as a multi-user backend requires.

A multi-user backend (Kubeflow's central dashboard, behind its auth proxy) wants a bearer
token on every request: from a file (:data:`SA_TOKEN_PATH`, the ServiceAccount token KFP
projects into a pod for audience ``pipelines.kubeflow.org``, is read when nothing is named
and it exists), or from an environment variable. :class:`KfpAuth` holds it and an optional
CA bundle for a private TLS endpoint.

The run's pods cannot read the submitting machine's disk: when the profile names an object
store (``pipeline.profiles.<P>.storage.object_store``) every local data file is staged there
first (:func:`~lorafleet.staging.stage_spec`), so the spec the run gets carries only URIs and
digests; a local data path with no store to stage it to is refused before anything is sent.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import kfp

from lorafleet.errors import LorafleetError, SpecError
from lorafleet.fleet import FleetSpec, PlatformProfile, load_fleet, spec_to_json
from lorafleet.local import new_run_id
from lorafleet.pipelines.compile import compile_fleet
from lorafleet.pipelines.platform import spec_profile
from lorafleet.staging import local_data, stage_spec
from lorafleet.storage import Storage

__all__ = [
    "CONNECT_TIMEOUT_S",
    "SA_TOKEN_PATH",
    "KfpAuth",
    "Submission",
    "check_reachable",
    "cluster_spec",
    "kfp_auth",
    "submit_fleet",
]

CONNECT_TIMEOUT_S = 5.0
"""How long a KFP endpoint has to accept a connection before ``submit`` gives up on it."""


# Where Kubeflow's PodDefault projects a ServiceAccount token for the pipelines API
# (kfp.client.KF_PIPELINES_SA_TOKEN_PATH); a pod's default token has the API server's audience.
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"


@dataclass(frozen=True)
class KfpAuth:
    """How ``submit`` authenticates to the pipelines API.

    Attributes:
        token_file: a file holding the bearer token, re-read on every request (a projected
            ServiceAccount token is rotated by the kubelet).
        token: the bearer token itself (from an environment variable).
        ca_cert: a PEM bundle that signs the endpoint's TLS certificate.
    """

    token_file: str | None = None
    token: str | None = None
    ca_cert: str | None = None


def kfp_auth(
    token_file: str | Path | None = None,
    token_env: str | None = None,
    ca_cert: str | Path | None = None,
    sa_token_path: str | Path = SA_TOKEN_PATH,
) -> KfpAuth:
    """The credentials ``submit`` sends, checked before anything is sent.

    Args:
        token_file: a file holding the token (``--token-file``).
        token_env: an environment variable holding the token (``--token-env``).
        ca_cert: a CA bundle for the endpoint's certificate (``--ca-cert``).
        sa_token_path: the in-pod token used when neither ``token_file`` nor ``token_env``
            is given and it exists.

    Returns:
        The credentials; no token when none is named and there is no in-pod token.

    Raises:
        LorafleetError: one line naming the option whose file or variable is missing or empty.
    """
    if token_file and token_env:
        raise LorafleetError("--token-file and --token-env: give one token, not two")
    if ca_cert and not Path(ca_cert).is_file():
        raise LorafleetError(f"--ca-cert {ca_cert}: no such file")
    ca = str(ca_cert) if ca_cert else None
    if token_env:
        token = os.environ.get(token_env, "").strip()
        if not token:
            raise LorafleetError(f"--token-env {token_env}: the variable is not set or empty")
        return KfpAuth(token=token, ca_cert=ca)
    if token_file is None and Path(sa_token_path).is_file():
        token_file = sa_token_path
    if token_file is None:
        return KfpAuth(ca_cert=ca)
    try:
        empty = not Path(token_file).read_text().strip()
    except OSError as exc:
        raise LorafleetError(
            f"--token-file {token_file}: cannot read it: {exc.strerror or exc}"
        ) from None
    if empty:
        raise LorafleetError(f"--token-file {token_file}: the file is empty")
    return KfpAuth(token_file=str(token_file), ca_cert=ca)


class _Client(kfp.Client):
    """``kfp.Client`` asking healthz once: its own five tries, five seconds apart, would turn
    a refused token (401) into half a minute's wait and a timeout that hides the status."""

    def get_kfp_healthz(self, sleep_duration: int = 5):
        return self._healthz_api.healthz_service_get_healthz()


@dataclass(frozen=True)
class Submission:
    """What :func:`submit_fleet` created on the endpoint."""

    pipeline_id: str
    version_id: str
    run_id: str
    run_name: str
    experiment_id: str


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


def _pipeline_id(client, name: str, namespace: str | None) -> str | None:
    """The id of pipeline ``name`` in ``namespace`` (shared pipelines when ``None``).

    ``kfp.Client.get_pipeline_id`` searches only the shared pipelines: in a multi-user
    backend a second submit would not find the namespace's own pipeline and collide on its
    name.
    """
    import json

    found = client.list_pipelines(
        filter=json.dumps(
            {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]}
        ),
        namespace=namespace,
        page_size=2,
    ).pipelines
    if not found:
        return None
    if len(found) > 1:
        raise LorafleetError(f"{len(found)} pipelines are named {name}; delete all but one")
    return found[0].pipeline_id


def submit_fleet(
    spec_path: str | Path,
    host: str,
    profile: str | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
    auth: KfpAuth | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    image: str | None = None,
) -> Submission:
    """Compile, upload and run the fleet pipeline of ``spec_path`` on ``host``.

    Args:
        spec_path: the fleet spec; its local data files are staged to the profile's store.
        host: the Kubeflow Pipelines API endpoint, e.g. ``http://ml-pipeline-ui.kubeflow``.
        profile: a cluster profile of the spec's ``pipeline.profiles`` (``None``: no settings).
        namespace: the user namespace of a multi-user deployment; the pipeline, experiment
            and run are looked up and created there.
        service_account: the Kubernetes ServiceAccount the run's pods use.
        auth: the bearer token and CA bundle (see :func:`kfp_auth`; default: none).
        experiment: the experiment the run belongs to, created when missing (default: the
            fleet's name).
        run_name: the run's display name (default: ``<fleet name>-<UTC time>``).
        image: the component image every step runs (see
            :func:`~lorafleet.pipelines.compile.compile_fleet`).

    Returns:
        The pipeline, version, run and experiment ids.

    Raises:
        LorafleetError: if the spec or profile is wrong, a local data file has no store to be
            staged to (see :func:`cluster_spec`), or the endpoint is unreachable
            (:func:`check_reachable`, checked before anything is staged), refuses or fails.
    """
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials
    from kfp_server_api.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    auth = auth or KfpAuth()
    spec = load_fleet(spec_path, check_files=False)
    platform = spec_profile(spec_path, profile) if profile else None
    check_reachable(host)
    spec = cluster_spec(spec, spec_path, profile, platform)
    # A connection lost later fails below in one line: no retry warning per attempt.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    name = f"lorafleet-fleet-{profile}" if profile else "lorafleet-fleet"
    stamp = new_run_id()
    run_name = run_name or f"{spec.name}-{stamp}"
    credentials = ServiceAccountTokenVolumeCredentials(auth.token_file) if auth.token_file else None
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            # kfp.Client warns on every construction that it needs a v2 backend: we know.
            warnings.simplefilter("ignore", FutureWarning)
            package = str(compile_fleet(Path(tmp) / f"{name}.yaml", platform, image=image))
            client = _Client(
                host=host,
                namespace=namespace or "kubeflow",
                existing_token=auth.token,
                credentials=credentials,
                ssl_ca_cert=auth.ca_cert,
            )
            if namespace:  # without one, kfp.Client asked healthz to find the mode itself
                client.get_kfp_healthz()
            pipeline_id = _pipeline_id(client, name, namespace)
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
            # Found by name, or created: a multi-user backend refuses a run without one.
            experiment_id = client.create_experiment(
                experiment or spec.name, namespace=namespace
            ).experiment_id
            run = client.run_pipeline(
                experiment_id=experiment_id,
                job_name=run_name,
                pipeline_id=pipeline_id,
                version_id=version_id,
                params={"spec_json": spec_to_json(spec), "experts": [e.name for e in spec.experts]},
                service_account=service_account,
            )
    except ApiException as exc:
        hint = (
            " (pass a token: --token-file or --token-env)"
            if exc.status == 401 and not (auth.token or auth.token_file)
            else ""
        )
        raise LorafleetError(
            f"{host}: Kubeflow Pipelines answered {exc.status} {exc.reason}: "
            f"{str(exc.body)[:200]}{hint}"
        ) from None
    except HTTPError as exc:
        # MaxRetryError carries the last attempt's error; its text names the pool, not why.
        reason = getattr(exc, "reason", None) or exc
        raise LorafleetError(
            f"{host}: cannot reach Kubeflow Pipelines: {str(reason).rpartition(': ')[2] or type(reason).__name__}"
        ) from None
    return Submission(
        pipeline_id=pipeline_id,
        version_id=version_id,
        run_id=run.run_id,
        run_name=run_name,
        experiment_id=experiment_id,
    )
