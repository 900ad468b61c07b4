"""The registry versions adapters and keeps their lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafleet.registry import Registry


def _adapter(tmp_path: Path) -> Path:
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.safetensors").write_bytes(b"weights")
    return d


def test_versions_increment_and_lineage_is_kept(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    src = _adapter(tmp_path)
    first = reg.register(
        "job-analyzer", src, {"base": {"fingerprint": "abc"}}, lambda v: f"# card {v}\n"
    )
    second = reg.register(
        "job-analyzer", src, {"base": {"fingerprint": "abc"}}, lambda v: f"# card {v}\n"
    )
    assert (first["version"], second["version"]) == ("v1", "v2")
    v2 = Path(second["path"])
    assert (v2 / "README.md").read_text() == "# card v2\n"
    lineage = json.loads((v2 / "lineage.json").read_text())
    assert lineage == {"base": {"fingerprint": "abc"}, "expert": "job-analyzer", "version": "v2"}
    assert reg.latest("job-analyzer")["version"] == "v2"
    assert [v["version"] for v in Registry(tmp_path / "reg").versions("job-analyzer")] == [
        "v1",
        "v2",
    ]


def test_production_pointer(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    src = _adapter(tmp_path)
    assert reg.production("job-analyzer") is None
    for _ in range(2):
        reg.register("job-analyzer", src, {}, lambda v: "")
    reg.set_production("job-analyzer", "v1")
    assert Registry(tmp_path / "reg").production("job-analyzer")["version"] == "v1"
    with pytest.raises(KeyError, match="no version v9"):
        reg.set_production("job-analyzer", "v9")
    assert reg.production("job-analyzer")["version"] == "v1"


def test_incomplete_adapter_is_refused_and_nothing_written(tmp_path: Path) -> None:
    src = _adapter(tmp_path)
    (src / "adapter_model.safetensors").unlink()
    reg = Registry(tmp_path / "reg")
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors"):
        reg.register("x", src, {}, lambda v: "")
    assert reg.versions("x") == [] and not (tmp_path / "reg" / "x").exists()
