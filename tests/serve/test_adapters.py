"""Adapter admission: one test per rejection reason, each on a real adapter broken one way."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path

import pytest

from lorafleet.base import fingerprint_model
from lorafleet.serve.adapters import (
    WEIGHTS,
    AdapterRejected,
    BaseModelInfo,
    check_adapter_files,
    resolve_source,
    validate_name,
)
from lorafleet.serve.model import LorafleetRuntime
from lorafleet.storage import PVC_MOUNTS_ENV, PVC_ROOT_ENV, RetryPolicy, Storage

from ..conftest import S3_BUCKET
from .conftest import DIGESTED, make_adapter

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


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ('{"r": 8, "target_modules": ', "adapter_config.json: not JSON (line 1:"),
        ("[1, 2]", "adapter_config.json: expected a JSON object"),
        ('{"r": "eight"}', "r and rank_pattern must be positive integers"),
        (b"\xff\xfe{}", "adapter_config.json: not UTF-8 text"),
    ],
)
def test_a_broken_adapter_config_is_a_format_rejection_in_one_line(
    fleet_adapters: dict[str, Path], base_info: BaseModelInfo, copy_adapter, config, says
) -> None:
    # Before: a raw JSONDecodeError, which the admin API answered as 500 with a traceback
    path = copy_adapter(fleet_adapters[GOOD])
    target = path / "adapter_config.json"
    target.write_bytes(config if isinstance(config, bytes) else config.encode())
    err = rejected(path, base_info)
    assert err.reason == "format" and says in str(err) and "\n" not in str(err)


def test_a_truncated_safetensors_file_is_a_format_rejection(
    fleet_adapters: dict[str, Path], base_info: BaseModelInfo, copy_adapter
) -> None:
    path = copy_adapter(fleet_adapters[GOOD])
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = rejected(path, base_info)
    assert err.reason == "format" and "not a readable safetensors file" in str(err)
    assert "\n" not in str(err)


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
    # Given a local adapter, a claim listed in LORAFLEET_PVC_MOUNTS and one found only
    # under LORAFLEET_PVC_ROOT (the runtime's older convention, still honoured)
    shutil.copytree(fleet_adapters[GOOD], tmp_path / "mnt" / "models" / "expert" / "v1")
    shutil.copytree(fleet_adapters[GOOD], tmp_path / "pvc" / "adapters" / "expert" / "v1")
    monkeypatch.setenv(PVC_MOUNTS_ENV, f"models={tmp_path / 'mnt' / 'models'}")
    monkeypatch.setenv(PVC_ROOT_ENV, str(tmp_path / "pvc"))
    cache = tmp_path / "cache"

    assert resolve_source("a", fleet_adapters[GOOD], cache) == fleet_adapters[GOOD]
    assert (
        resolve_source("a", "pvc://models/expert/v1", cache)
        == tmp_path / "mnt" / "models" / "expert" / "v1"
    )
    assert (
        resolve_source("a", "pvc://adapters/expert/v1", cache)
        == tmp_path / "pvc" / "adapters" / "expert" / "v1"
    )
    bad = {
        "pvc://adapters/../../etc": "'..' segments are not allowed",
        "pvc://x//etc": "no leading '/'",
        "pvc://..//etc": "invalid claim '..'",
        "pvc://datasets/expert/v1": "claim 'datasets' is not mounted",
        "pvc://models/expert/v9": "no such adapter directory",
        "ftp://host/x": "unknown scheme 'ftp'",
        str(tmp_path / "nowhere"): "no such adapter directory",
    }
    for source, why in bad.items():
        with pytest.raises(AdapterRejected) as err:
            resolve_source("a", source, cache)
        assert err.value.reason == "source", source
        assert why in err.value.detail and "\n" not in str(err.value), source
    assert not cache.exists(), "local sources are never copied"


@pytest.mark.integration  # a real S3-compatible server on 127.0.0.1
def test_s3_source_downloads_once_into_the_cache(
    fleet_adapters: dict[str, Path], tmp_path: Path, s3_endpoint: str
) -> None:
    # Given an adapter uploaded to a real S3-compatible server
    storage = Storage(s3_endpoint_url=s3_endpoint)
    source = f"s3://{S3_BUCKET}/{uuid.uuid4().hex}/expert-0/"
    storage.upload_tree(fleet_adapters[GOOD], source)

    # When it is resolved, then its objects are removed and it is resolved again
    first = resolve_source("a", source, tmp_path, storage)
    for loc in storage.list_prefix(source):
        storage.delete(loc)
    again = resolve_source("a", source, tmp_path, storage)

    # Then the second answer is the first download, whole
    assert first == again and first.parent == tmp_path
    assert sorted(p.name for p in first.iterdir()) == sorted(
        p.name for p in fleet_adapters[GOOD].iterdir()
    )
    for file in fleet_adapters[GOOD].iterdir():
        assert (first / file.name).read_bytes() == file.read_bytes()


@pytest.mark.integration  # a real S3-compatible server on 127.0.0.1
def test_missing_or_unreachable_bucket_sources_are_rejected(
    tmp_path: Path, s3_endpoint: str, unreachable_endpoint: str
) -> None:
    fast = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.01)
    missing = f"s3://{S3_BUCKET}/{uuid.uuid4().hex}/expert-0"
    cases = [
        (Storage(s3_endpoint_url=s3_endpoint), missing, f"{missing}: no objects under this prefix"),
        (
            Storage(s3_endpoint_url=unreachable_endpoint, retry=fast),
            missing,
            f"{missing}: store unreachable or unavailable after 2 tries",
        ),
        (
            Storage(s3_endpoint_url=s3_endpoint),
            f"s3://{S3_BUCKET}",
            f"s3://{S3_BUCKET}: expected s3://BUCKET/PREFIX",
        ),
    ]
    for storage, source, message in cases:
        with pytest.raises(AdapterRejected) as err:
            resolve_source("a", source, tmp_path / "cache", storage)
        assert err.value.reason == "source"
        assert err.value.detail.startswith(message), err.value.detail
        assert "\n" not in str(err.value)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir()), (
        "a failed download leaves nothing in the cache"
    )


def test_registered_adapter_with_matching_digests_loads(tiny_base: Path, tmp_path: Path) -> None:
    path = make_adapter(tiny_base, tmp_path / "registered", seed=7, registered=True)
    lineage = json.loads((path / "lineage.json").read_text())
    assert set(lineage["files"]) == set(DIGESTED)  # the digests exist before they are checked

    runtime = LorafleetRuntime("base", tiny_base, {"registered": path})

    assert runtime.load()
    [info] = runtime.adapter_table()
    assert info["name"] == "registered" and info["base_fingerprint"] is not None
    runtime.stop()


def test_flipped_byte_in_a_registered_adapter_is_refused(
    tiny_base: Path, tmp_path: Path, base_info: BaseModelInfo
) -> None:
    path = make_adapter(tiny_base, tmp_path / "registered", seed=7, registered=True)
    expected = json.loads((path / "lineage.json").read_text())["files"][WEIGHTS]
    weights = bytearray((path / WEIGHTS).read_bytes())
    weights[len(weights) // 2] ^= 0x01  # one bit of one weight: the file still parses
    (path / WEIGHTS).write_bytes(weights)

    err = rejected(path, base_info)

    assert err.reason == "digest"
    actual = hashlib.sha256(weights).hexdigest()
    assert WEIGHTS in err.detail
    assert expected[:12] in err.detail and actual[:12] in err.detail


def test_adapter_without_digests_in_lineage_still_loads(
    tiny_base: Path, tmp_path: Path, base_info: BaseModelInfo
) -> None:
    # An adapter registered before digests were recorded: lineage.json without "files".
    path = make_adapter(tiny_base, tmp_path / "older", seed=7, registered=True)
    lineage = json.loads((path / "lineage.json").read_text())
    del lineage["files"]
    (path / "lineage.json").write_text(json.dumps(lineage))

    info = check_adapter_files("older", path, base_info, max_rank=64)

    assert info.base_fingerprint == base_info.fingerprint
