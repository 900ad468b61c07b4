"""Upload the compiled fleet pipeline to a Kubeflow Pipelines endpoint and start a run.

The pipeline is compiled fresh (with a profile's Kubernetes settings when one is named) and
uploaded under ``lorafleet-fleet[-PROFILE]`` in the run's namespace: as a new pipeline the
first time, as a new version of it afterwards. The run gets the spec (as JSON) and every
expert's name as its parameters, exactly as a run started in the KFP UI would, and belongs
to an experiment (found by name, created when missing), as a multi-user backend requires.

A multi-user backend (Kubeflow's central dashboard, behind its auth proxy) wants a bearer
token on every request: from a file or an environment variable; when neither is named, the
ServiceAccount token KFP projects into a pod for audience ``pipelines.kubeflow.org``
(:data:`SA_TOKEN_PATH`) where it exists, else the token of the kubeconfig's current user
(``$KUBECONFIG`` or ``~/.kube/config``, read by the ``kubernetes`` client's loader, which
also runs an exec plugin such as ``aws eks get-token``). :class:`KfpAuth` holds it and an
optional CA bundle for a private TLS endpoint.

Before anything is uploaded, the backend's version is read from its healthz endpoint
(``tag_name``): a backend older than :data:`MIN_KFP_VERSION` is refused in one line.

The run's pods cannot read the submitting machine's disk: when the profile names an object
store (``pipeline.profiles.<P>.storage.object_store``) every local data file is staged there
first (:func:`~lorafleet.staging.stage_spec`), so the spec the run gets carries only URIs and
digests; a local data path with no store to stage it to is refused before anything is sent.
"""

from __future__ import annotations

import json
import logging
import os
import re
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
    "MIN_KFP_VERSION",
    "SA_TOKEN_PATH",
    "KfpAuth",
    "Submission",
    "check_backend_version",
    "check_reachable",
    "cluster_spec",
    "kfp_auth",
    "kubeconfig_token",
    "submit_fleet",
]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
"""How long a KFP endpoint has to accept a connection before ``submit`` gives up on it."""


# Where Kubeflow's PodDefault projects a ServiceAccount token for the pipelines API
# (kfp.client.KF_PIPELINES_SA_TOKEN_PATH); a pod's default token has the API server's audience.
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"

MIN_KFP_VERSION = (2, 14)
"""The oldest Kubeflow Pipelines backend the compiled pipeline runs on: it collects the
outputs of ``dsl.ParallelFor`` iterations with ``dsl.Collected`` (docs/kubeflow.md)."""


@dataclass(frozen=True)
class KfpAuth:
    """How ``submit`` authenticates to the pipelines API.

    Attributes:
        token_file: a file holding the bearer token, re-read on every request (a projected
            ServiceAccount token is rotated by the kubelet).
        token: the bearer token itself (from an environment variable or the kubeconfig).
        ca_cert: a PEM bundle that signs the endpoint's TLS certificate.
        source: where the token came from, for the line that says it was refused.
    """

    token_file: str | None = None
    token: str | None = None
    ca_cert: str | None = None
    source: str | None = None


def kubeconfig_token(kubeconfig: str | Path | None = None) -> tuple[str, str] | None:
    """The bearer token of the kubeconfig's current user, and who that user is.

    The ``kubernetes`` client's loader reads the file (``kubeconfig``, else ``$KUBECONFIG``,
    else ``~/.kube/config``) and resolves the user's credentials as ``kubectl`` does: a
    ``token``, a ``tokenFile``, or an ``exec`` plugin's token (``aws eks get-token``,
    ``gke-gcloud-auth-plugin``, ``kubelogin``).

    Returns:
        ``(token, "the kubeconfig's user NAME")``; ``None`` when there is no kubeconfig, or
        its current user has no token (client certificates, or a plugin that failed: a
        warning says why).
    """
    from kubernetes import config
    from kubernetes.client import Configuration
    from kubernetes.config.config_exception import ConfigException

    path = Path(
        kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or "~/.kube/config"
    ).expanduser()
    if not path.is_file():
        return None
    configuration = Configuration()
    try:
        _, context = config.list_kube_config_contexts(config_file=str(path))
        config.load_kube_config(config_file=str(path), client_configuration=configuration)
    except (ConfigException, OSError, ValueError) as exc:
        log.warning("kubeconfig %s: no token taken from it: %s", path, " ".join(str(exc).split()))
        return None
    bearer = configuration.api_key.get("authorization", "")
    token = bearer.removeprefix("Bearer ").strip()
    if not token:
        return None
    user = (context or {}).get("context", {}).get("user", "?")
    return token, f"the kubeconfig's user {user} ({path})"


def kfp_auth(
    token_file: str | Path | None = None,
    token_env: str | None = None,
    ca_cert: str | Path | None = None,
    sa_token_path: str | Path = SA_TOKEN_PATH,
    kubeconfig: str | Path | None = None,
) -> KfpAuth:
    """The credentials ``submit`` sends, checked before anything is sent.

    Args:
        token_file: a file holding the token (``--token-file``).
        token_env: an environment variable holding the token (``--token-env``).
        ca_cert: a CA bundle for the endpoint's certificate (``--ca-cert``).
        sa_token_path: the in-pod token used when neither ``token_file`` nor ``token_env``
            is given and it exists.
        kubeconfig: the kubeconfig whose current user's token is used when there is no
            token so far (default: ``$KUBECONFIG``, else ``~/.kube/config``; see
            :func:`kubeconfig_token`).

    Returns:
        The credentials; no token when none is named, there is no in-pod token and the
        kubeconfig's user has none.

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
        return KfpAuth(token=token, ca_cert=ca, source=f"--token-env {token_env}")
    source = f"--token-file {token_file}"
    if token_file is None and Path(sa_token_path).is_file():
        token_file, source = sa_token_path, f"the in-pod token {sa_token_path}"
    if token_file is None:
        found = kubeconfig_token(kubeconfig)
        if found is None:
            return KfpAuth(ca_cert=ca)
        return KfpAuth(token=found[0], ca_cert=ca, source=found[1])
    try:
        empty = not Path(token_file).read_text().strip()
    except OSError as exc:
        raise LorafleetError(
            f"--token-file {token_file}: cannot read it: {exc.strerror or exc}"
        ) from None
    if empty:
        raise LorafleetError(f"--token-file {token_file}: the file is empty")
    return KfpAuth(token_file=str(token_file), ca_cert=ca, source=source)


class _Client(kfp.Client):
    """``kfp.Client`` asking healthz once: its own five tries, five seconds apart, would turn
    a refused token (401) into half a minute's wait and a timeout that hides the status.

    The answer is kept whole in ``healthz`` (the generated model drops ``tag_name``, the
    backend's version)."""

    healthz: dict | None = None

    def get_kfp_healthz(self, sleep_duration: int = 5):
        from kfp_server_api import V2beta1GetHealthzResponse

        answer = self._healthz_api.healthz_service_get_healthz(_preload_content=False)
        self.healthz = json.loads(answer.data or b"{}")
        return V2beta1GetHealthzResponse(multi_user=self.healthz.get("multi_user"))


def check_backend_version(healthz: dict, host: str) -> None:
    """Refuse a backend older than :data:`MIN_KFP_VERSION`, by its healthz ``tag_name``.

    A development build says ``unknown``: it is let through, with a warning.

    Raises:
        LorafleetError: ``HOST: Kubeflow Pipelines TAG is older than 2.14 ...``.
    """
    tag = str(healthz.get("tag_name") or "")
    found = re.match(r"v?(\d+)\.(\d+)", tag)
    least = ".".join(map(str, MIN_KFP_VERSION))
    if found is None:
        log.warning(
            "%s: Kubeflow Pipelines does not say its version (tag_name %r); lorafleet needs "
            "%s or newer",
            host,
            tag,
            least,
        )
        return
    if (int(found[1]), int(found[2])) < MIN_KFP_VERSION:
        raise LorafleetError(
            f"{host}: Kubeflow Pipelines {tag} is older than {least}, the oldest backend the "
            "fleet pipeline runs on: upgrade it"
        )


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


def _connect(host: str, namespace: str | None, auth: KfpAuth) -> _Client:
    """A client of ``host`` that has read the backend's healthz and checked its version.

    Raises:
        LorafleetError: if the backend is older than :data:`MIN_KFP_VERSION`, or has no v2
            API at all (a 404 on its healthz: Kubeflow Pipelines 1.x).
        ApiException: any other refusal (a 401 without a valid token).
    """
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials
    from kfp_server_api.exceptions import ApiException

    credentials = ServiceAccountTokenVolumeCredentials(auth.token_file) if auth.token_file else None
    try:
        client = _Client(
            host=host,
            namespace=namespace or "kubeflow",
            existing_token=auth.token,
            credentials=credentials,
            ssl_ca_cert=auth.ca_cert,
        )
        if client.healthz is None:  # kfp.Client asks it itself only without a namespace
            client.get_kfp_healthz()
    except ApiException as exc:
        if exc.status != 404:
            raise
        least = ".".join(map(str, MIN_KFP_VERSION))
        raise LorafleetError(
            f"{host}: no Kubeflow Pipelines v2 API there (GET /apis/v2beta1/healthz answered "
            f"404): lorafleet needs Kubeflow Pipelines {least} or newer"
        ) from None
    check_backend_version(client.healthz, host)
    return client


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
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            # kfp.Client warns on every construction that it needs a v2 backend: we know.
            warnings.simplefilter("ignore", FutureWarning)
            package = str(
                compile_fleet(Path(tmp) / f"{name}.yaml", platform, image=image, base=spec.base)
            )
            client = _connect(host, namespace, auth)
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
        hint = ""
        if exc.status == 401:
            hint = (
                f" (the token from {auth.source} was refused)"
                if auth.source
                else " (pass a token: --token-file or --token-env)"
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
