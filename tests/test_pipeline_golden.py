"""The compiled pipeline is a golden file: compile fresh, compare, reload.

Regenerate with ``make goldens`` after a deliberate change.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from kfp.components import load_component_from_file

from lorafleet.pipelines.compile import GOLDEN, compile_fleet


def test_compiled_pipeline_matches_the_committed_yaml(tmp_path: Path) -> None:
    fresh = compile_fleet(tmp_path / "fleet_pipeline.yaml").read_text()
    if os.environ.get("UPDATE_GOLDENS") == "1":
        GOLDEN.write_text(fresh)
    assert GOLDEN.is_file(), "run `make goldens` to create the golden"
    assert fresh == GOLDEN.read_text(), (
        "pipeline changed: review, then `UPDATE_GOLDENS=1 make test`"
    )


def test_golden_reloads_and_has_the_fleet_shape() -> None:
    component = load_component_from_file(str(GOLDEN))
    assert component.name == "lorafleet-fleet"
    spec = yaml.safe_load(GOLDEN.read_text())
    params = spec["root"]["inputDefinitions"]["parameters"]
    # what a KFP UI user sets without editing the spec
    assert set(params) == {
        "spec_json",
        "experts",
        "spec_uri",
        "base_model",
        "base_revision",
        "max_loss_ratio",
        "gate_overrides",
    }
    assert params["spec_uri"]["defaultValue"] == "" and params["max_loss_ratio"]["isOptional"]
    dag = spec["root"]["dag"]["tasks"]
    loop = next(t for t in dag.values() if "parameterIterator" in t)
    assert loop["iteratorPolicy"]["parallelismLimit"] == 8
    expert_tasks = spec["components"]["comp-lorafleet-expert"]["dag"]["tasks"]
    assert {"validate-data", "plan-shards", "curate", "train", "evaluate", "gate"} <= set(
        expert_tasks
    )
    # synthesis and per-row curation fan out over the expert's data shards
    shard_loop = next(t for t in expert_tasks.values() if "parameterIterator" in t)
    assert shard_loop["parameterIterator"]["items"]["inputParameter"].endswith("plan-shards-Output")
    assert {"synthesize", "curate-shard"} == set(
        spec["components"][shard_loop["componentRef"]["name"]]["dag"]["tasks"]
    )
    assert expert_tasks["curate"]["inputs"]["artifacts"]["prepared"]["taskOutputArtifact"][
        "producerTask"
    ].startswith("for-loop")
    # register runs only in the branch where the gate passed, reject in the other
    branches = next(
        c for name, c in spec["components"].items() if name.startswith("comp-condition-branches")
    )["dag"]["tasks"]
    conditions = {
        spec["components"][t["componentRef"]["name"]]["dag"]["tasks"].popitem()[0]: t[
            "triggerPolicy"
        ]["condition"]
        for t in branches.values()
    }
    assert (
        conditions["register"] == "inputs.parameter_values['pipelinechannel--gate-passed'] == true"
    )
    assert conditions["reject"].startswith("!(")


def test_steps_with_effects_outside_kfp_are_never_cached() -> None:
    spec = yaml.safe_load(GOLDEN.read_text())
    tasks = {}
    for component in [spec["root"], *spec["components"].values()]:
        tasks.update(component.get("dag", {}).get("tasks", {}))
    caching = {name: task.get("cachingOptions", {}) for name, task in tasks.items()}
    # register (a registry version), publish (a live smoke test), deploy (rollouts) and
    # resolve-fleet (it reads the data files' digests)
    for name in ("register", "publish", "deploy", "resolve-fleet"):
        assert caching[name] == {}, name
    # the data and training steps may come from KFP's cache
    for name in ("validate-data", "curate", "train", "evaluate", "gate"):
        assert caching[name] == {"enableCache": True}, name


def test_each_expert_step_reads_its_own_view_of_the_fleet() -> None:
    spec = yaml.safe_load(GOLDEN.read_text())
    tasks = {}
    for component in [spec["root"], *spec["components"].values()]:
        tasks.update(component.get("dag", {}).get("tasks", {}))

    def source(step: str) -> str:
        param = tasks[step]["inputs"]["parameters"]["spec_json"]
        channel = param.get("taskOutputParameter") or {}
        return channel.get("outputParameterKey") or param.get("componentInputParameter", "")

    assert source("build-base") == "base_view"
    for step in ("validate-data", "plan-shards", "curate"):
        assert source(step).endswith("data"), step
    assert source("train").endswith("train")
    assert source("evaluate").endswith("evaluate")
    assert source("gate").endswith("gate")
    # the uncached steps read the whole resolved fleet
    assert source("register").endswith("expert-views-fleet")
    for step in ("publish", "deploy"):
        param = tasks[step]["inputs"]["parameters"]["spec_json"]["taskOutputParameter"]
        assert param == {"outputParameterKey": "fleet_json", "producerTask": "resolve-fleet"}
    # inside the data-shard loop, each step reads the view its loop item carries
    for step in ("synthesize", "curate-shard"):
        param = tasks[step]["inputs"]["parameters"]["spec_json"]
        assert param["componentInputParameter"].endswith("loop-item"), step
        assert "view" in param["parameterExpressionSelector"], step
