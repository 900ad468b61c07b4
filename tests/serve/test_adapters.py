"""Adapter admission: one test per rejection reason, each on a real adapter broken one way."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from lorafleet.base import fingerprint_model
from lorafleet.errors import LorafleetError
from lorafleet.serve.adapters import (
    AdapterRejected,
    BaseModelInfo,
    check_adapter_files,
    resolve_source,
    validate_name,
)
from lorafleet.serve.model import LorafleetRuntime

from .conftest import make_adapter

GOOD = "expert-0"


@pytest.fixture(scope="module")
def base_info(tiny_base: Path) -> BaseModelInfo:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    return BaseModelInfo.from_model(model, fingerprint_model(tiny_base))


def rejected(path: Path, base_info: BaseModelInfo, max_rank: int = 64, **kw) -> AdapterRejected:
    with pytest.raises(AdapterRejected) as err:
        check_adapter_files("candidate", path, base_info, max_rank, **kw)
    assert "\n" not in str(err.value), "a rejection is one line"
    return err.value


def test_good_adapter_passes(fleet_adapters: dict[str, Path], base_info: BaseModelInfo) -> None:
    info = check_adapter_files(GOOD, fleet_adapters[GOOD], base_info, max_rank=4)
    assert info.rank == 4
    assert set(info.target_modules) == {"q_proj", "v_proj"}
    assert info.base_fingerprint is None


@pytest.mark.parametrize("name", ["../etc", "a/b", "a.b", "", "-lead", "x" * 65, "sp ace"])
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(AdapterRejected) as err:
        validate_name(name)
    assert err.value.reason == "name"


def test_pickle_weights_are_refused(
    fleet_adapters: dict[str, Path], base_info: BaseModelInfo, copy_adapter
) -> None:
    import torch
    from safetensors.torch import load_file

    path = copy_adapter(fleet_adapters[GOOD])
    torch.save(load_file(path / "adapter_model.safetensors"), path / "adapter_model.bin")
    (path / "adapter_model.safetensors").unlink()
    err = rejected(path, base_info)
    assert err.reason == "format"
    assert "adapter_model.bin" in str(err) and "pickle" in str(err)


def test_missing_weights_are_refused(
    fleet_adapters: dict[str, Path], base_info: BaseModelInfo, copy_adapter
) -> None:
    path = copy_adapter(fleet_adapters[GOOD])
    (path / "adapter_model.safetensors").unlink()
    assert rejected(path, base_info).reason == "format"


def test_rank_above_server_max_is_refused(
    tiny_adapters: dict[str, Path], base_info: BaseModelInfo
) -> None:
    err = rejected(tiny_adapters["job-analyzer"], base_info, max_rank=4)  # rank 8
    assert err.reason == "rank"
    assert "8" in err.detail and "4" in err.detail


def test_target_modules_missing_from_base_are_refused(
    fleet_adapters: dict[str, Path], base_info: BaseModelInfo, copy_adapter
) -> None:
    path = copy_adapter(fleet_adapters[GOOD])
    config = json.loads((path / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "c_attn"]  # a GPT-2 module name
    (path / "adapter_config.json").write_text(json.dumps(config))
    err = rejected(path, base_info)
    assert err.reason == "target_modules"
    assert "c_attn" in err.detail


def test_lineage_fingerprint_must_match_the_base(
    fleet_adapters: dict[str, Path], base_info: BaseModelInfo, copy_adapter
) -> None:
    path = copy_adapter(fleet_adapters[GOOD])
    lineage = {"base": {"model": "other", "fingerprint": "0123456789abcdef"}}
    (path / "lineage.json").write_text(json.dumps(lineage))
    err = rejected(path, base_info)
    assert err.reason == "fingerprint"
    assert "0123456789abcdef" in err.detail and base_info.fingerprint in err.detail

    lineage["base"]["fingerprint"] = base_info.fingerprint
    (path / "lineage.json").write_text(json.dumps(lineage))
    info = check_adapter_files("candidate", path, base_info, 64)
    assert info.base_fingerprint == base_info.fingerprint


def test_lineage_may_be_required(fleet_adapters: dict[str, Path], base_info: BaseModelInfo) -> None:
    err = rejected(fleet_adapters[GOOD], base_info, require_lineage=True)
    assert err.reason == "fingerprint"
    assert "no lineage.json" in err.detail


def test_tensor_shape_mismatch_is_refused(
    fleet_adapters: dict[str, Path], base_info: BaseModelInfo, copy_adapter
) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    path = copy_adapter(fleet_adapters[GOOD])
    tensors = load_file(path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    rank, width = tensors[key].shape
    tensors[key] = torch.zeros(rank, width + 16)  # an adapter made for a wider base
    save_file(tensors, path / "adapter_model.safetensors")
    err = rejected(path, base_info)
    assert err.reason == "shape"
    assert key in err.detail and str(width + 16) in err.detail


def test_lora_bias_is_checked_not_crashed_on(
    tiny_base: Path, tmp_path: Path, base_info: BaseModelInfo
) -> None:
    # lora_bias=True gives lora_B a 1-D bias of out_features: checked, and not a rank.
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True, init_lora_weights=False
    )
    path = tmp_path / "biased"
    get_peft_model(model, config).save_pretrained(path)
    tensors = load_file(path / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.bias") for k in tensors)  # the case exists before it is checked
    assert check_adapter_files("biased", path, base_info, max_rank=4).rank == 4
    key = next(k for k in tensors if k.endswith("lora_B.bias"))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1)
    save_file(tensors, path / "adapter_model.safetensors")
    err = rejected(path, base_info)
    assert err.reason == "shape" and key in err.detail


def test_adapter_that_changes_nothing_is_refused(tiny_base: Path, tmp_path: Path) -> None:
    # PEFT's default init zeroes B: the adapter is a no-op until trained.
    noop = make_adapter(tiny_base, tmp_path / "untrained", seed=0, init_random=False)
    runtime = LorafleetRuntime("base", tiny_base, {"untrained": noop})
    with pytest.raises(AdapterRejected) as err:
        runtime.load()
    assert err.value.reason == "no_effect"


def test_local_and_pvc_sources(
    fleet_adapters: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_source("a", fleet_adapters[GOOD], tmp_path) == fleet_adapters[GOOD]
    claim = tmp_path / "pvc" / "adapters"
    shutil.copytree(fleet_adapters[GOOD], claim / "expert" / "v1")
    monkeypatch.setenv("LORAFLEET_PVC_ROOT", str(tmp_path / "pvc"))
    assert resolve_source("a", "pvc://adapters/expert/v1", tmp_path) == claim / "expert" / "v1"
    for bad in ("pvc://adapters/../../etc", "ftp://host/x", str(tmp_path / "nowhere")):
        with pytest.raises(AdapterRejected) as err:
            resolve_source("a", bad, tmp_path)
        assert err.value.reason == "source"


def test_bucket_sources_download_once(fleet_adapters: dict[str, Path], tmp_path: Path) -> None:
    calls = []

    def download(bucket: str, prefix: str, dest: Path) -> None:
        calls.append((bucket, prefix))
        shutil.copytree(fleet_adapters[GOOD], dest, dirs_exist_ok=True)

    hooks = {"gs": download}
    first = resolve_source("a", "gs://models/fleet/expert-0/", tmp_path, hooks)
    again = resolve_source("a", "gs://models/fleet/expert-0/", tmp_path, hooks)
    assert first == again and (first / "adapter_model.safetensors").is_file()
    assert calls == [("models", "fleet/expert-0")]


def test_s3_without_boto3_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # makes `import boto3` fail
    with pytest.raises(LorafleetError, match="pip install boto3"):
        resolve_source("a", "s3://bucket/adapters/expert-0", tmp_path)
    assert not list(tmp_path.iterdir()), "a failed download leaves nothing in the cache"
