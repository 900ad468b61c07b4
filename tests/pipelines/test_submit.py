"""``lorafleet submit`` against a Kubeflow Pipelines API stand-in, at the HTTP boundary only.

The stand-in (:class:`FakeKfp`) stands in for the KFP backend (the ml-pipeline API server,
behind Kubeflow's auth proxy in a multi-user install): a real HTTP server on 127.0.0.1 that
answers the KFP v2beta1 REST calls ``kfp.Client`` makes (healthz, pipelines
list/upload/upload_version, versions list, experiments list/create, runs create) and records
every request; the client, its serialization and our code run for real. In multi-user mode
it enforces what the backend does there: a request without the bearer token is 401, a run
without an experiment is refused ("Experiment id can not be empty in multi-user mode"), and
pipelines and experiments belong to a namespace, listed only there. Its healthz answers as
the API server's own handler does (backend/src/apiserver/main.go, ``healthzResponse``:
``commit_sha``, ``tag_name``, ``multi_user``, ``pipeline_store``), with the version in
``version``; ``v1_only`` makes it a Kubeflow Pipelines 1.x backend, which has no v2 API.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
import yaml

from lorafleet.errors import LorafleetError, SpecError
from lorafleet.fleet import load_fleet, spec_from_json
from lorafleet.pipelines.compile import profile_golden
from lorafleet.pipelines.submit import KfpAuth, kfp_auth, submit_fleet
from lorafleet.storage import Storage

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CLUSTER_SPEC = EXAMPLES / "fleet-cluster.yaml"
API = "/apis/v2beta1"
# The aws profile's object store in CLUSTER_SPEC: its bucket is made on the moto server.
AWS_BUCKET = "marketplace-ml"


# What the KFP backend answers a multi-user run create with no experiment id.
NO_EXPERIMENT = "Invalid input error: Experiment id can not be empty in multi-user mode."


class FakeKfp(ThreadingHTTPServer):
    """The KFP API's pipeline, experiment and run endpoints, in memory; ``requests`` records
    each call. ``multi_user`` and ``token`` turn on the multi-user backend's rules."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        # id -> {"display_name", "namespace" ("" = shared), "versions": [ids]}
        self.pipelines: dict[str, dict] = {}
        self.experiments: dict[str, dict] = {}  # id -> {"display_name", "namespace"}
        self.fail_runs = False
        self.multi_user = False
        self.token: str | None = None  # the bearer token every request must carry
        self.version = "2.14.0"  # the backend's TAG_NAME ("unknown" in a development build)
        self.v1_only = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeKfp

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _record(self) -> dict:
        parts = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        req = {
            "method": self.command,
            "path": parts.path,
            "query": {k: v[0] for k, v in parse_qs(parts.query).items()},
            "content_type": self.headers.get("Content-Type", ""),
            "authorization": self.headers.get("Authorization"),
            "body": body,
        }
        self.server.requests.append(req)
        return req

    def _refused(self, req: dict) -> bool:
        """Answer 401 to a request without the token (as the auth proxy does)."""
        token = self.server.token
        if token is None or req["authorization"] == f"Bearer {token}":
            return False
        self._send(401, {"error": "Unauthorized: no valid bearer token", "code": 16})
        return True

    def _namespace(self, req: dict) -> str:
        """The namespace a list or upload is scoped to ("" = shared, as the backend reads it)."""
        return req["query"].get("namespace", "") if self.server.multi_user else ""

    @staticmethod
    def _wanted(req: dict) -> set[str]:
        return {
            p["stringValue"]
            for p in json.loads(req["query"].get("filter", '{"predicates": []}'))["predicates"]
            if p["key"] == "display_name"
        }

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        req, pipelines = self._record(), self.server.pipelines
        if self._refused(req):
            return None
        if self.server.v1_only and req["path"].startswith(API):
            return self._send(404, {"error": "Not Found", "code": 5})
        if req["path"] == f"{API}/healthz":
            return self._send(
                200,
                {
                    "commit_sha": "0" * 40,
                    "tag_name": self.server.version,
                    "multi_user": self.server.multi_user,
                    "pipeline_store": "database",
                },
            )
        if req["path"] in (f"{API}/pipelines", f"{API}/experiments"):
            kind = req["path"].rpartition("/")[2]
            items = pipelines if kind == "pipelines" else self.server.experiments
            wanted, namespace = self._wanted(req), self._namespace(req)
            found = [
                {f"{kind[:-1]}_id": pid, "display_name": p["display_name"]}
                for pid, p in items.items()
                if (not wanted or p["display_name"] in wanted) and p["namespace"] == namespace
            ]
            return self._send(200, {kind: found} if found else {})
        pid = req["path"].removeprefix(f"{API}/pipelines/").removesuffix("/versions")
        if req["path"].endswith("/versions") and pid in pipelines:
            versions = [
                {"pipeline_id": pid, "pipeline_version_id": v}
                for v in reversed(pipelines[pid]["versions"])
            ]
            return self._send(200, {"pipeline_versions": versions})
        return self._send(404, {"error": f"no route {req['path']}"})

    def do_POST(self) -> None:
        req, pipelines = self._record(), self.server.pipelines
        if self._refused(req):
            return None
        if req["path"] == f"{API}/pipelines/upload":
            name, namespace = req["query"]["name"], self._namespace(req)
            if any(
                p["display_name"] == name and p["namespace"] == namespace
                for p in pipelines.values()
            ):
                return self._send(409, {"error": f"pipeline {name} already exists"})
            pid = f"pipeline-{len(pipelines) + 1}"
            pipelines[pid] = {
                "display_name": name,
                "namespace": namespace,
                "versions": [f"{pid}-v1"],
            }
            return self._send(200, {"pipeline_id": pid, "display_name": name})
        if req["path"] == f"{API}/pipelines/upload_version":
            pid = req["query"]["pipelineid"]
            versions = pipelines[pid]["versions"]
            versions.append(f"{pid}-v{len(versions) + 1}")
            return self._send(200, {"pipeline_id": pid, "pipeline_version_id": versions[-1]})
        if req["path"] == f"{API}/experiments":
            body, experiments = json.loads(req["body"]), self.server.experiments
            eid = f"experiment-{len(experiments) + 1}"
            namespace = body.get("namespace") or "" if self.server.multi_user else ""
            experiments[eid] = {"display_name": body["display_name"], "namespace": namespace}
            return self._send(200, {**body, "experiment_id": eid})
        if req["path"] == f"{API}/runs":
            if self.server.fail_runs:
                return self._send(500, {"error": "scheduler is down"})
            run = json.loads(req["body"])
            if self.server.multi_user and not run.get("experiment_id"):
                return self._send(400, {"error": NO_EXPERIMENT, "code": 3})
            if run.get("experiment_id") and run["experiment_id"] not in self.server.experiments:
                return self._send(404, {"error": f"experiment {run['experiment_id']} not found"})
            return self._send(200, {**run, "run_id": f"run-{len(self.server.requests)}"})
        return self._send(404, {"error": f"no route {req['path']}"})


@pytest.fixture(autouse=True)
def no_kubeconfig(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """No kubeconfig of the machine running the tests lends submit a token."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path_factory.mktemp("kube") / "absent"))


@pytest.fixture
def kfp_api() -> Iterator[FakeKfp]:
    server = FakeKfp()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def aws_store(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The aws profile's bucket on the moto server, which the standard variable points at
    (the profile names no endpoint: on AWS, botocore finds S3 itself)."""
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=AWS_BUCKET)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)


@pytest.fixture
def staged_spec(tmp_path: Path) -> Path:
    """CLUSTER_SPEC with its data already in a store: nothing to stage, nothing to refuse."""
    text = CLUSTER_SPEC.read_text().replace("_data: data/", f"_data: s3://{AWS_BUCKET}/data/")
    assert "_data: data/" not in text
    (tmp_path / "staged.yaml").write_text(text)
    return tmp_path / "staged.yaml"


def _uploaded_file(req: dict) -> str:
    """The ``uploadfile`` part of a multipart upload request."""
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + req["content_type"].encode() + b"\r\n\r\n" + req["body"]
    )
    parts = [
        p
        for p in message.iter_parts()
        if p.get_param("name", header="content-disposition") == "uploadfile"
    ]
    assert len(parts) == 1, "no uploadfile part"
    return parts[0].get_payload(decode=True).decode()


def test_submit_uploads_the_profile_pipeline_then_a_new_version(
    kfp_api: FakeKfp, aws_store: None, tmp_path: Path
) -> None:
    # Given an empty endpoint, when the CLI submits the aws profile
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafleet.cli",
            "submit",
            str(CLUSTER_SPEC),
            "--host",
            kfp_api.url,
            "--profile",
            "aws",
            "--service-account",
            "lorafleet-pipeline",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    calls = [(r["method"], r["path"]) for r in kfp_api.requests]
    assert calls == [
        ("GET", f"{API}/healthz"),
        ("GET", f"{API}/pipelines"),
        ("POST", f"{API}/pipelines/upload"),
        ("GET", f"{API}/pipelines/pipeline-1/versions"),
        ("GET", f"{API}/experiments"),
        ("POST", f"{API}/experiments"),
        ("POST", f"{API}/runs"),
    ]
    # then the uploaded file is the aws pipeline, with its Kubernetes settings
    upload = kfp_api.requests[2]
    assert upload["query"]["name"] == "lorafleet-fleet-aws"
    uploaded = _uploaded_file(upload)
    assert uploaded == profile_golden("aws").read_text()
    assert "kubernetes" in list(yaml.safe_load_all(uploaded))[1]["platforms"]
    # and the run starts that version with the spec and every expert as parameters
    run = json.loads(kfp_api.requests[6]["body"])
    spec = load_fleet(CLUSTER_SPEC, check_files=False)
    # in an experiment named after the fleet, created as it was missing
    assert json.loads(kfp_api.requests[5]["body"])["display_name"] == spec.name
    assert run["experiment_id"] == "experiment-1"
    assert run["pipeline_version_reference"] == {
        "pipeline_id": "pipeline-1",
        "pipeline_version_id": "pipeline-1-v1",
    }
    assert run["service_account"] == "lorafleet-pipeline"
    assert run["display_name"].startswith(f"{spec.name}-")
    params = run["runtime_config"]["parameters"]
    assert params["experts"] == [e.name for e in spec.experts]
    sent = spec_from_json(params["spec_json"])
    assert sent.name == spec.name
    # with the data staged to the profile's store: URIs and digests, no local path
    assert all(
        e.seed_data == f"s3://{AWS_BUCKET}/lorafleet/data/sha256/{e.seed_data_sha256}/seed.jsonl"
        for e in sent.experts
    )
    assert (
        f"run {run['display_name']} started: run run-7" in proc.stderr
    )  # the console writes to stderr

    # When it is submitted again, then the pipeline gets a new version and the run uses it,
    # in the same experiment
    done = submit_fleet(CLUSTER_SPEC, kfp_api.url, profile="aws")
    again = [(r["method"], r["path"]) for r in kfp_api.requests[7:]]
    assert again == [
        ("GET", f"{API}/healthz"),
        ("GET", f"{API}/pipelines"),
        ("POST", f"{API}/pipelines/upload_version"),
        ("GET", f"{API}/experiments"),
        ("POST", f"{API}/runs"),
    ]
    assert kfp_api.requests[9]["query"]["pipelineid"] == "pipeline-1"
    assert _uploaded_file(kfp_api.requests[9]) == uploaded
    assert (done.pipeline_id, done.version_id) == ("pipeline-1", "pipeline-1-v2")
    assert done.experiment_id == "experiment-1"
    assert (
        json.loads(kfp_api.requests[11]["body"])["pipeline_version_reference"][
            "pipeline_version_id"
        ]
        == "pipeline-1-v2"
    )


def test_submit_without_profile_uploads_the_plain_pipeline(
    kfp_api: FakeKfp, staged_spec: Path
) -> None:
    done = submit_fleet(staged_spec, kfp_api.url)
    upload = next(r for r in kfp_api.requests if r["path"].endswith("/upload"))
    assert upload["query"]["name"] == "lorafleet-fleet"
    assert len(list(yaml.safe_load_all(_uploaded_file(upload)))) == 1, (
        "no platform section without a profile"
    )
    assert done.run_id.startswith("run-")


def test_a_failing_endpoint_is_one_clear_error(kfp_api: FakeKfp, staged_spec: Path) -> None:
    kfp_api.fail_runs = True
    with pytest.raises(LorafleetError, match=r"answered 500 .*scheduler is down"):
        submit_fleet(staged_spec, kfp_api.url, profile="gcp")


# --- data by URI ---------------------------------------------------------------------------

TINY = """\
apiVersion: lorafleet/v1
name: tiny
experts:
  - name: job-analyzer
    task: job-analyzer
    seed_data: {data}/job-analyzer/seed.jsonl
    eval_data: {data}/job-analyzer/eval.jsonl
pipeline:
  profiles:
    onprem:
      {storage}
"""


def test_submit_stages_local_data_to_the_profiles_store(
    kfp_api: FakeKfp, s3_endpoint: str, tmp_path: Path
) -> None:
    # Given a profile whose store is an S3-compatible server at its own endpoint
    bucket, prefix = "lorafleet-submit", uuid.uuid4().hex
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    storage_block = (
        f"storage: {{object_store: 's3://{bucket}/{prefix}', endpoint: '{s3_endpoint}'}}"
    )
    (tmp_path / "f.yaml").write_text(TINY.format(data=EXAMPLES / "data", storage=storage_block))

    submit_fleet(tmp_path / "f.yaml", kfp_api.url, profile="onprem")

    # Then the run's spec names each file by its URI and digest, and the object is that file
    run = json.loads(next(r for r in kfp_api.requests if r["path"] == f"{API}/runs")["body"])
    expert = spec_from_json(run["runtime_config"]["parameters"]["spec_json"]).experts[0]
    storage = Storage(s3_endpoint_url=s3_endpoint, pvc_mounts={})
    for field, name in (("seed_data", "seed.jsonl"), ("eval_data", "eval.jsonl")):
        local = EXAMPLES / "data" / "job-analyzer" / name
        digest = hashlib.sha256(local.read_bytes()).hexdigest()
        uri = f"s3://{bucket}/{prefix}/data/sha256/{digest}/{name}"
        assert (getattr(expert, field), getattr(expert, f"{field}_sha256")) == (uri, digest)
        assert storage.read_bytes(uri) == local.read_bytes()
    # and every step's pod is told the endpoint
    uploaded = _uploaded_file(next(r for r in kfp_api.requests if r["path"].endswith("/upload")))
    executors = next(yaml.safe_load_all(uploaded))["deploymentSpec"]["executors"]
    assert {"name": "AWS_ENDPOINT_URL_S3", "value": s3_endpoint} in executors["exec-validate-data"][
        "container"
    ]["env"]


def test_local_data_without_a_store_is_refused_before_anything_is_sent(
    kfp_api: FakeKfp, tmp_path: Path
) -> None:
    (tmp_path / "f.yaml").write_text(TINY.format(data=EXAMPLES / "data", storage="storage: {}"))
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "lorafleet.cli", "submit", "f.yaml"),
            *("--host", kfp_api.url, "--profile", "onprem"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        f"error: f.yaml: experts.0.seed_data: {EXAMPLES}/data/job-analyzer/seed.jsonl is on this "
        "machine, not where the pipeline's pods can read it: set "
        "pipeline.profiles.onprem.storage.object_store to upload it there, or stage the data "
        "first (lorafleet spec stage)\n"
    )
    assert kfp_api.requests == []
    # Without a profile there is no store either
    with pytest.raises(SpecError, match=r"experts.0.seed_data: .* pass --profile P whose pipeline"):
        submit_fleet(tmp_path / "f.yaml", kfp_api.url)
    assert kfp_api.requests == []


# --- a multi-user backend -------------------------------------------------------------------

TOKEN = "team-token-1"


@pytest.fixture
def multi_user(kfp_api: FakeKfp) -> FakeKfp:
    """The stand-in with the multi-user backend's rules on: token, experiment, namespaces."""
    kfp_api.multi_user, kfp_api.token = True, TOKEN
    return kfp_api


@pytest.mark.filterwarnings("ignore::FutureWarning")  # kfp.Client's "needs a v2 backend"
def test_multi_user_backend_refuses_what_submit_used_to_send(
    multi_user: FakeKfp, staged_spec: Path
) -> None:
    # Given the rules: no token, no entry
    with pytest.raises(LorafleetError, match=r"answered 401 .*pass a token: --token-file"):
        submit_fleet(staged_spec, multi_user.url, namespace="team-a")
    assert [r["path"] for r in multi_user.requests] == [f"{API}/healthz"]
    # and a run with no experiment is refused in the backend's words (what submit sent before)
    import kfp
    from kfp_server_api.exceptions import ApiException

    client = kfp.Client(host=multi_user.url, namespace="team-a", existing_token=TOKEN)
    with pytest.raises(ApiException) as refused:
        client.run_pipeline(experiment_id=None, job_name="r", pipeline_id="p", version_id="v")
    assert refused.value.status == 400 and NO_EXPERIMENT in refused.value.body


def test_multi_user_submit_is_authenticated_and_namespaced(
    multi_user: FakeKfp, staged_spec: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given a token in an environment variable, when team-a submits twice
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    auth = kfp_auth(token_env="KFP_TOKEN", sa_token_path=tmp_path / "absent")
    first = submit_fleet(
        staged_spec, multi_user.url, profile="aws", namespace="team-a", auth=auth, run_name="r1"
    )
    second = submit_fleet(staged_spec, multi_user.url, profile="aws", namespace="team-a", auth=auth)
    # Then every request carried the token
    assert {r["authorization"] for r in multi_user.requests} == {f"Bearer {TOKEN}"}
    # and the second found team-a's pipeline and experiment: a new version, no collision
    assert first.pipeline_id == second.pipeline_id
    assert (first.version_id, second.version_id) == ("pipeline-1-v1", "pipeline-1-v2")
    assert first.experiment_id == second.experiment_id
    assert multi_user.pipelines["pipeline-1"]["namespace"] == "team-a"
    assert multi_user.experiments[first.experiment_id] == {
        "display_name": load_fleet(staged_spec, check_files=False).name,
        "namespace": "team-a",
    }
    runs = [json.loads(r["body"]) for r in multi_user.requests if r["path"] == f"{API}/runs"]
    assert runs[0]["display_name"] == "r1"
    assert {r["experiment_id"] for r in runs} == {first.experiment_id}

    # When team-b submits the same pipeline name, from a token file, in its own experiment
    (tmp_path / "token").write_text(TOKEN + "\n")
    third = submit_fleet(
        staged_spec,
        multi_user.url,
        profile="aws",
        namespace="team-b",
        auth=kfp_auth(token_file=tmp_path / "token"),
        experiment="nightly",
    )
    # Then it gets its own pipeline and experiment in team-b
    assert third.pipeline_id != first.pipeline_id
    assert multi_user.pipelines[third.pipeline_id]["namespace"] == "team-b"
    assert multi_user.experiments[third.experiment_id] == {
        "display_name": "nightly",
        "namespace": "team-b",
    }


def test_the_in_pod_token_is_used_when_none_is_named(
    multi_user: FakeKfp, staged_spec: Path, tmp_path: Path
) -> None:
    # Given the token Kubeflow projects into a notebook or pipeline pod
    (tmp_path / "token").write_text(TOKEN)
    auth = kfp_auth(sa_token_path=tmp_path / "token")
    assert auth == KfpAuth(
        token_file=str(tmp_path / "token"), source=f"the in-pod token {tmp_path / 'token'}"
    )
    done = submit_fleet(staged_spec, multi_user.url, namespace="team-a", auth=auth)
    assert done.run_id.startswith("run-")
    assert {r["authorization"] for r in multi_user.requests} == {f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"token_env": "NO_SUCH_TOKEN_VAR"},
            "--token-env NO_SUCH_TOKEN_VAR: the variable is not set",
        ),
        ({"token_file": "/no/such/token"}, "--token-file /no/such/token: cannot read it"),
        ({"ca_cert": "/no/such/ca.pem"}, "--ca-cert /no/such/ca.pem: no such file"),
        ({"token_file": "t", "token_env": "T"}, "give one token, not two"),
    ],
)
def test_credentials_mistakes_are_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(LorafleetError, match=re.escape(message)):
        kfp_auth(**kwargs)


def test_submit_cli_takes_token_experiment_run_name_and_image(
    multi_user: FakeKfp, staged_spec: Path, tmp_path: Path
) -> None:
    image = "registry.example/ml/lorafleet@sha256:" + "ab" * 32
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "lorafleet.cli", "submit", str(staged_spec)),
            *("--host", multi_user.url, "--profile", "gcp", "--namespace", "team-a"),
            *("--token-env", "KFP_TOKEN", "--experiment", "weekly", "--run-name", "weekly-1"),
            *("--image", image),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "KFP_TOKEN": TOKEN},
    )
    assert proc.returncode == 0, proc.stderr
    run = json.loads(next(r for r in multi_user.requests if r["path"] == f"{API}/runs")["body"])
    assert run["display_name"] == "weekly-1"
    assert multi_user.experiments[run["experiment_id"]]["display_name"] == "weekly"
    upload = next(r for r in multi_user.requests if r["path"].endswith("/upload"))
    executors = next(yaml.safe_load_all(_uploaded_file(upload)))["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {image}


# --- the backend's version and the kubeconfig's token ---------------------------------------


@pytest.mark.parametrize(
    ("tag", "refused"),
    [("2.13.1", True), ("v2.5.0", True), ("1.8.5", True), ("2.14.0", False), ("2.17.3", False)],
)
def test_a_backend_older_than_2_14_is_refused_before_anything_is_sent(
    kfp_api: FakeKfp, staged_spec: Path, tag: str, refused: bool
) -> None:
    kfp_api.version = tag
    if not refused:
        assert submit_fleet(staged_spec, kfp_api.url).run_id.startswith("run-")
        return
    with pytest.raises(LorafleetError) as error:
        submit_fleet(staged_spec, kfp_api.url, namespace="team-a")
    assert str(error.value) == (
        f"{kfp_api.url}: Kubeflow Pipelines {tag} is older than 2.14, the oldest backend the "
        "fleet pipeline runs on: upgrade it"
    )
    assert [r["path"] for r in kfp_api.requests] == [f"{API}/healthz"]


def test_a_v1_backend_and_a_development_build(
    kfp_api: FakeKfp, staged_spec: Path, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # A Kubeflow Pipelines 1.x backend has no v2 API: one line, through the real CLI
    kfp_api.v1_only = True
    proc = subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", "submit", str(staged_spec), "--host", kfp_api.url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert (proc.returncode, proc.stderr) == (
        2,
        f"error: {kfp_api.url}: no Kubeflow Pipelines v2 API there (GET /apis/v2beta1/healthz "
        "answered 404): lorafleet needs Kubeflow Pipelines 2.14 or newer\n",
    )
    assert [r["path"] for r in kfp_api.requests] == [f"{API}/healthz"]
    # A development build does not say its version: a warning, and the run goes ahead
    kfp_api.v1_only, kfp_api.version = False, "unknown"
    assert submit_fleet(staged_spec, kfp_api.url).run_id.startswith("run-")
    assert "does not say its version (tag_name 'unknown')" in caplog.text


def _kubeconfig(path: Path, server: str, user: dict) -> Path:
    """A kubeconfig whose current context's user is ``user`` (as kubectl writes one)."""
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server}}],
                "users": [{"name": "alice", "user": user}],
                "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "alice"}}],
                "current-context": "ctx",
            }
        )
    )
    return path


def test_the_kubeconfigs_token_is_sent_when_none_is_given(
    multi_user: FakeKfp, staged_spec: Path, tmp_path: Path
) -> None:
    # Given a kubeconfig whose current user has a token, and no token option
    config = _kubeconfig(tmp_path / "config", "https://k8s.example:6443", {"token": TOKEN})
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "lorafleet.cli", "submit", str(staged_spec)),
            *("--host", multi_user.url, "--namespace", "team-a"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "KUBECONFIG": str(config)},
    )
    # Then every request carried it
    assert proc.returncode == 0, proc.stderr
    assert {r["authorization"] for r in multi_user.requests} == {f"Bearer {TOKEN}"}


def test_an_exec_plugins_token_is_sent_and_a_refused_one_is_named(
    multi_user: FakeKfp, staged_spec: Path, tmp_path: Path
) -> None:
    # Given a kubeconfig whose user gets its token from an exec plugin (as EKS and GKE do)
    plugin = tmp_path / "get-token.py"
    plugin.write_text(
        "import json, sys\n"
        "token = sys.argv[1]\n"
        "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1beta1',"
        " 'kind': 'ExecCredential', 'status': {'token': token}}))\n"
    )

    def user(token: str) -> dict:
        return {
            "exec": {
                "apiVersion": "client.authentication.k8s.io/v1beta1",
                "command": sys.executable,
                "args": [str(plugin), token],
            }
        }

    config = _kubeconfig(tmp_path / "config", "https://k8s.example:6443", user(TOKEN))
    auth = kfp_auth(sa_token_path=tmp_path / "absent", kubeconfig=config)
    assert auth.token == TOKEN and auth.source == f"the kubeconfig's user alice ({config})"
    assert submit_fleet(staged_spec, multi_user.url, namespace="team-a", auth=auth).run_id
    # And a token the backend refuses is one line naming where it came from
    _kubeconfig(config, "https://k8s.example:6443", user("stale-token"))
    auth = kfp_auth(sa_token_path=tmp_path / "absent", kubeconfig=config)
    with pytest.raises(
        LorafleetError, match=r"answered 401 .*\(the token from the kubeconfig's user alice"
    ):
        submit_fleet(staged_spec, multi_user.url, namespace="team-a", auth=auth)


def test_a_kubeconfig_without_a_token_sends_none(tmp_path: Path) -> None:
    # Client certificates only: nothing to send, no error
    config = _kubeconfig(
        tmp_path / "config",
        "https://k8s.example:6443",
        {"client-certificate-data": "Zm9v", "client-key-data": "YmFy"},
    )
    assert kfp_auth(sa_token_path=tmp_path / "absent", kubeconfig=config) == KfpAuth()
    # No kubeconfig at all: likewise
    assert kfp_auth(sa_token_path=tmp_path / "absent", kubeconfig=tmp_path / "none") == KfpAuth()
