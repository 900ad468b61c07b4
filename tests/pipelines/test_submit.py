"""``lorafleet submit`` against a Kubeflow Pipelines API stand-in, at the HTTP boundary only.

The stand-in is a real HTTP server on 127.0.0.1 that answers the KFP v2beta1 REST calls
``kfp.Client`` makes (healthz, pipelines list/upload/upload_version, versions list, runs
create) and records every request; the client, its serialization and our code run for real.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from lorafleet.errors import LorafleetError
from lorafleet.fleet import load_fleet
from lorafleet.pipelines.compile import profile_golden
from lorafleet.pipelines.submit import submit_fleet

pytestmark = pytest.mark.integration

CLUSTER_SPEC = Path(__file__).resolve().parents[2] / "examples" / "fleet-cluster.yaml"
API = "/apis/v2beta1"


class FakeKfp(ThreadingHTTPServer):
    """The KFP API's pipeline and run endpoints, in memory; ``requests`` records each call."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.pipelines: dict[str, dict] = {}  # id -> {"display_name", "versions": [ids]}
        self.fail_runs = False

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
            "body": body,
        }
        self.server.requests.append(req)
        return req

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        req, pipelines = self._record(), self.server.pipelines
        if req["path"] == f"{API}/healthz":
            return self._send(200, {"multi_user": False})
        if req["path"] == f"{API}/pipelines":
            wanted = {
                p["stringValue"]
                for p in json.loads(req["query"].get("filter", '{"predicates": []}'))["predicates"]
                if p["key"] == "display_name"
            }
            found = [
                {"pipeline_id": pid, "display_name": p["display_name"]}
                for pid, p in pipelines.items()
                if not wanted or p["display_name"] in wanted
            ]
            return self._send(200, {"pipelines": found} if found else {})
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
        if req["path"] == f"{API}/pipelines/upload":
            pid = f"pipeline-{len(pipelines) + 1}"
            pipelines[pid] = {"display_name": req["query"]["name"], "versions": [f"{pid}-v1"]}
            return self._send(200, {"pipeline_id": pid, "display_name": req["query"]["name"]})
        if req["path"] == f"{API}/pipelines/upload_version":
            pid = req["query"]["pipelineid"]
            versions = pipelines[pid]["versions"]
            versions.append(f"{pid}-v{len(versions) + 1}")
            return self._send(200, {"pipeline_id": pid, "pipeline_version_id": versions[-1]})
        if req["path"] == f"{API}/runs":
            if self.server.fail_runs:
                return self._send(500, {"error": "scheduler is down"})
            run = json.loads(req["body"])
            return self._send(200, {**run, "run_id": f"run-{len(self.server.requests)}"})
        return self._send(404, {"error": f"no route {req['path']}"})


@pytest.fixture
def kfp_api() -> Iterator[FakeKfp]:
    server = FakeKfp()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


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
    kfp_api: FakeKfp, tmp_path: Path
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
        ("POST", f"{API}/runs"),
    ]
    # then the uploaded file is the aws pipeline, with its Kubernetes settings
    upload = kfp_api.requests[2]
    assert upload["query"]["name"] == "lorafleet-fleet-aws"
    uploaded = _uploaded_file(upload)
    assert uploaded == profile_golden("aws").read_text()
    assert "kubernetes" in list(yaml.safe_load_all(uploaded))[1]["platforms"]
    # and the run starts that version with the spec and every expert as parameters
    run = json.loads(kfp_api.requests[4]["body"])
    spec = load_fleet(CLUSTER_SPEC, check_files=False)
    assert run["pipeline_version_reference"] == {
        "pipeline_id": "pipeline-1",
        "pipeline_version_id": "pipeline-1-v1",
    }
    assert run["service_account"] == "lorafleet-pipeline"
    assert run["display_name"].startswith(f"{spec.name}-")
    params = run["runtime_config"]["parameters"]
    assert params["experts"] == [e.name for e in spec.experts]
    assert json.loads(params["spec_json"])["name"] == spec.name
    assert (
        f"run {run['display_name']} started: run run-5" in proc.stderr
    )  # the console writes to stderr

    # When it is submitted again, then the pipeline gets a new version and the run uses it
    done = submit_fleet(CLUSTER_SPEC, kfp_api.url, profile="aws")
    again = [(r["method"], r["path"]) for r in kfp_api.requests[5:]]
    assert again == [
        ("GET", f"{API}/healthz"),
        ("GET", f"{API}/pipelines"),
        ("POST", f"{API}/pipelines/upload_version"),
        ("POST", f"{API}/runs"),
    ]
    assert kfp_api.requests[7]["query"]["pipelineid"] == "pipeline-1"
    assert _uploaded_file(kfp_api.requests[7]) == uploaded
    assert (done.pipeline_id, done.version_id) == ("pipeline-1", "pipeline-1-v2")
    assert (
        json.loads(kfp_api.requests[8]["body"])["pipeline_version_reference"]["pipeline_version_id"]
        == "pipeline-1-v2"
    )


def test_submit_without_profile_uploads_the_plain_pipeline(kfp_api: FakeKfp) -> None:
    done = submit_fleet(CLUSTER_SPEC, kfp_api.url)
    upload = next(r for r in kfp_api.requests if r["path"].endswith("/upload"))
    assert upload["query"]["name"] == "lorafleet-fleet"
    assert len(list(yaml.safe_load_all(_uploaded_file(upload)))) == 1, (
        "no platform section without a profile"
    )
    assert done.run_id.startswith("run-")


def test_a_failing_endpoint_is_one_clear_error(kfp_api: FakeKfp) -> None:
    kfp_api.fail_runs = True
    with pytest.raises(LorafleetError, match=r"answered 500 .*scheduler is down"):
        submit_fleet(CLUSTER_SPEC, kfp_api.url, profile="gcp")
