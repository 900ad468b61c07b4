"""The compiled fleet pipeline as a cluster runs it: every step in its own container.

What stands in for the cluster, and why it is honest:

- the pipeline is compiled for a profile (``onprem``) whose object store is that server,
  and the compiled IR is what runs: its steps carry the profile's environment (the S3
  endpoint, the work store);
- every step runs in the component image (``components.IMAGE``, built by ``make
  image-test``) through ``kfp.local.DockerRunner`` on podman's Docker-compatible socket;
  containers share nothing but KFP's artifact folder (as a pod shares its artifact store)
  and the object store: no step sees this checkout or another step's disk;
- the object store is a real S3-compatible HTTP server (moto in server mode on the host,
  reached with ``network_mode=host``): data are staged there by ``lorafleet spec stage``,
  the registry and the adapter store live there;
- the served fleet is the runtime image, reading every adapter from S3, answering the
  ``openai`` client.

Then a spec naming a path on this machine (not staged) is run the same way: its first step
must refuse it in one line naming the path.

Prints one JSON line with what happened; exits non-zero on any failure. Called by
``make e2e-cluster`` (needs root, podman and runc, and the images of ``make image-test``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
BUCKET = "lorafleet-e2e"
RUNTIME_IMAGE = os.environ.get("RUNTIME_IMAGE", "localhost/lorafleet-runtime:test")
EXPERTS = ("job-analyzer", "proposal-writer")
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "e2e",
    "AWS_SECRET_ACCESS_KEY": "e2e-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _spec(endpoint: str) -> str:
    experts = "".join(
        f"  - name: {name}\n    task: {name}\n"
        f"    seed_data: {DATA}/{name}/seed.jsonl\n    eval_data: {DATA}/{name}/eval.jsonl\n"
        for name in EXPERTS
    )
    # The first expert's data goes through two parallel shards.
    experts = experts.replace(
        "/seed.jsonl\n", "/seed.jsonl\n    synthesis: {per_seed: 1, shards: 2}\n", 1
    )
    return f"""\
apiVersion: lorafleet/v1
name: e2e-cluster
base:
  model: demo
  demo: {{vocab_size: 512, hidden_size: 64, num_layers: 2, num_heads: 2, num_kv_heads: 1,
          intermediate_size: 128, pretrain_steps: 30, pretrain_seq_len: 64}}
expert_defaults:
  synthesis: {{per_seed: 1}}
  lora: {{r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear}}
  training: {{epochs: 1, learning_rate: 0.01, batch_size: 8, max_seq_len: 384}}
  gate: {{max_loss_ratio: 0.99, max_new_tokens: 8}}
experts:
{experts}serving:
  adapter_store: s3://{BUCKET}/adapters
registry:
  uri: s3://{BUCKET}/registry
pipeline:
  profiles:
    onprem:
      storage: {{object_store: "s3://{BUCKET}/fleet", endpoint: "{endpoint}"}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.5)
    raise SystemExit(f"e2e-cluster: {what} did not come up in {timeout:.0f} s")


@contextlib.contextmanager
def _process(args: list[str], env: dict | None = None):
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        yield proc
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()


def _keep_containers_until_read() -> None:
    """Two things kfp.local does that a cluster does not, undone here.

    It runs step containers with ``auto_remove=True``: through podman a container that
    fails fast is gone before its exit code and logs are read, and kfp counts it a
    SUCCESS. Each one is kept, its logs and exit code read, then removed. And a step with
    environment variables of its own (the compiled profile's) gets only those, not the
    runner's: on a cluster the credentials would come from the profile's Secret, which
    kfp.local does not read, so the runner's environment (the credentials) is kept under
    the step's own.
    """
    from kfp.local import docker_task_handler

    handler_init = docker_task_handler.DockerTaskHandler.__init__

    def init(self, *args, **kwargs) -> None:
        handler_init(self, *args, **kwargs)
        base = self.runner.container_run_args.get("environment") or {}
        self.env_vars = {**base, **(self.env_vars or {})}

    docker_task_handler.DockerTaskHandler.__init__ = init

    def run_docker_container(client, image, command, volumes, **run_args) -> int:
        run_args.pop("auto_remove", None)
        container = client.containers.run(
            image=docker_task_handler.add_latest_tag_if_not_present(image),
            command=command,
            detach=True,
            stdout=True,
            stderr=True,
            volumes=volumes,
            **run_args,
        )
        try:
            code = container.wait()["StatusCode"]
            print(container.logs().decode(errors="replace"), end="")
            return code
        finally:
            container.remove(force=True)

    docker_task_handler.run_docker_container = run_docker_container


def _compile(spec_path: Path, out: Path):
    """The pipeline compiled for the spec's ``onprem`` profile, loaded back from its IR."""
    from kfp import components

    from lorafleet.pipelines.compile import compile_fleet
    from lorafleet.pipelines.platform import spec_profile

    compile_fleet(out, spec_profile(spec_path, "onprem"))
    return components.load_component_from_file(str(out))


def _run_pipeline(pipeline, spec_json: str, root: Path, env: dict[str, str]) -> tuple[bool, str]:
    """The compiled pipeline, every step in the component image. Returns (ok, log)."""
    import io

    from kfp import local

    root.mkdir(parents=True)
    # The image runs as uid 10001: the folders kfp.local makes here must be writable to it.
    root.chmod(0o777)
    os.umask(0)
    local.init(
        runner=local.DockerRunner(network_mode="host", environment=env),
        pipeline_root=str(root),
    )
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        try:
            task = pipeline(spec_json=spec_json, experts=list(EXPERTS))
        except RuntimeError as error:
            return False, log.getvalue() + f"\n{error}"
    return True, Path(task.outputs["summary"].path).read_text()


def main() -> int:
    import boto3
    from openai import OpenAI

    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="lorafleet-e2e-cluster-"))
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(CREDENTIALS)
    os.environ["CONTAINERS_CONF"] = str(ROOT / "ci" / "containers.conf")
    sock = work / "podman.sock"
    result: dict = {"endpoint": endpoint}
    moto = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    with (
        _process([moto, "-H", "127.0.0.1", "-p", str(port)]),
        _process(["podman", "system", "service", "--time=0", f"unix://{sock}"]),
    ):
        s3 = boto3.client("s3", endpoint_url=endpoint)
        _wait(lambda: s3.list_buckets() is not None, "the S3 server")
        s3.create_bucket(Bucket=BUCKET)
        _wait(sock.exists, "podman's socket")
        os.environ["DOCKER_HOST"] = f"unix://{sock}"
        _keep_containers_until_read()

        spec_path = work / "fleet.yaml"
        spec_path.write_text(_spec(endpoint))
        staged = subprocess.run(
            [sys.executable, "-m", "lorafleet.cli", "spec", "stage", str(spec_path),
             "--profile", "onprem", "--json"],
            env={**os.environ, "AWS_ENDPOINT_URL_S3": endpoint},
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        # What the compiled profile does not set: the credentials a Secret would give.
        step_env = {**CREDENTIALS, "HF_HUB_OFFLINE": "1", "LORAFLEET_CACHE": "/tmp/lorafleet-cache"}
        pipeline = _compile(spec_path, work / "fleet_pipeline-onprem.yaml")
        ok, out = _run_pipeline(pipeline, staged, work / "pipeline", step_env)
        if not ok:
            print(out[-6000:], file=sys.stderr)
            raise SystemExit("e2e-cluster: the pipeline failed in its containers")
        summary = json.loads(out)
        result["pipeline_seconds"] = round(time.monotonic() - start, 1)
        experts = summary["experts"]
        result["experts_passed"] = sorted(n for n, x in experts.items() if x["gate_passed"])
        registered = {n: x["adapter_uri"] for n, x in experts.items() if x.get("registered")}
        result["adapters"] = registered
        result["shards"] = {n: x["curation"].get("shards") for n, x in experts.items()}
        if not registered or not all(u.startswith("s3://") for u in registered.values()):
            raise SystemExit(f"e2e-cluster: expected adapters registered in S3, got {registered}")

        # The runtime image serves the base and reads every adapter from the store.
        base_dir = next((work / "pipeline").rglob("lorafleet-base.json")).parent
        serve_port = _free_port()
        name = f"lorafleet-e2e-runtime-{os.getpid()}"
        args = ["podman", "run", "-d", "--name", name, "--network", "host",
                "-v", f"{base_dir}:/models/base:ro"]  # fmt: skip
        for key, value in {**step_env, "AWS_ENDPOINT_URL_S3": endpoint}.items():
            args += ["-e", f"{key}={value}"]
        args += [RUNTIME_IMAGE, "--base", "/models/base", "--port", str(serve_port)]
        args += [a for n, uri in registered.items() for a in ("--adapter", f"{n}={uri}")]
        subprocess.run(args, check=True, capture_output=True)
        replies: dict[str, bool] = {}
        served: set[str] = set()
        try:
            client = OpenAI(base_url=f"http://127.0.0.1:{serve_port}/openai/v1", api_key="none")

            def up() -> bool:
                state = subprocess.run(
                    ["podman", "inspect", "-f", "{{.State.Running}}", name],
                    capture_output=True,
                    text=True,
                ).stdout.strip()
                if state != "true":
                    raise SystemExit("e2e-cluster: the runtime container exited")
                return client.models.list() is not None

            _wait(up, "the runtime", timeout=300)
            served = {m.id for m in client.models.list()}
            replies = {}
            for expert in registered:
                reply = client.chat.completions.create(
                    model=expert,
                    messages=[{"role": "user", "content": "Title: Logo for a bakery"}],
                    max_tokens=8,
                )
                replies[expert] = reply.model == expert and reply.choices[0].finish_reason in (
                    "stop",
                    "length",
                )
            result["experts_served"] = sorted(e for e, ok in replies.items() if ok)
        finally:
            logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True)
            subprocess.run(["podman", "rm", "-f", name], capture_output=True)
            if not replies or not all(replies.values()) or not set(registered) <= served:
                print(logs.stdout[-3000:], logs.stderr[-3000:], file=sys.stderr)
        if not all(replies.values()) or not set(registered) <= served:
            raise SystemExit("e2e-cluster: the runtime did not serve every registered adapter")

        # A spec naming this machine's files, not staged: the first step must refuse it.
        from lorafleet.fleet import load_fleet, spec_to_json

        host_only = spec_to_json(load_fleet(spec_path))
        ok, out = _run_pipeline(pipeline, host_only, work / "pipeline-host-paths", step_env)
        seed = f"{DATA}/{EXPERTS[0]}/seed.jsonl"
        # The step's exception, as a pod's log shows it: the error and its one line.
        refused = [
            ln for ln in out.splitlines() if ln.startswith("lorafleet.errors.") and seed in ln
        ]
        if ok or not refused:
            print(out[-4000:], file=sys.stderr)
            raise SystemExit("e2e-cluster: a host-only data path was not refused in one line")
        result["host_path_refused"] = refused[0].strip()[:300]
    result["seconds"] = round(time.monotonic() - start, 1)
    shutil.rmtree(work, ignore_errors=True)
    # The real stdout: kfp.local indents what is printed through sys.stdout.
    sys.__stdout__.write(json.dumps(result, sort_keys=True) + "\n")
    sys.__stdout__.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
