"""The registry on a local folder: immutable versions, lineage with file digests, the
production pointer (compare-and-swap), prune, download, concurrent registers, and the
``lorafleet registry`` commands. tests/test_registry_s3.py runs the same on S3."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorafleet.registry import (
    STALE_CLAIM_S,
    ProductionChanged,
    Registry,
    RegistryError,
    fetch_adapter,
)
from lorafleet.storage import Storage

LINEAGE = {"base": {"fingerprint": "abc"}}


def _adapter(tmp_path: Path, weights: bytes = b"weights") -> Path:
    d = tmp_path / f"adapter-{hashlib.sha256(weights).hexdigest()[:8]}"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.safetensors").write_bytes(weights)
    return d


def _card(version: str) -> str:
    return f"# card {version}\n"


def test_versions_increment_and_lineage_records_file_digests(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    src = _adapter(tmp_path)
    first = reg.register("job-analyzer", src, LINEAGE, _card)
    second = reg.register("job-analyzer", src, LINEAGE, _card)

    assert (first["version"], second["version"]) == ("v1", "v2")
    v2 = Path(second["uri"])
    assert v2 == tmp_path / "reg" / "job-analyzer" / "v2"
    assert (v2 / "README.md").read_text() == "# card v2\n"
    files = {
        "adapter_config.json": hashlib.sha256(b"{}").hexdigest(),
        "adapter_model.safetensors": hashlib.sha256(b"weights").hexdigest(),
    }
    assert json.loads((v2 / "lineage.json").read_text()) == {
        **LINEAGE,
        "expert": "job-analyzer",
        "version": "v2",
        "files": files,
    }
    assert second["files"] == files and second["base_fingerprint"] == "abc"
    # Without an adapter store, serving reads the registry's own version folder.
    assert second["adapter_uri"] == str(v2)
    # A fresh reader sees the same, from the records alone.
    fresh = Registry(tmp_path / "reg")
    assert [v["version"] for v in fresh.versions("job-analyzer")] == ["v1", "v2"]
    assert fresh.latest("job-analyzer")["version"] == "v2"
    assert fresh.experts() == ["job-analyzer"]
    assert fresh.lineage("job-analyzer", "v1")["version"] == "v1"


def test_a_version_is_immutable_and_its_number_never_reused(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    reg.register("writer", _adapter(tmp_path, b"one"), LINEAGE, _card)
    before = (tmp_path / "reg/writer/v1/adapter_model.safetensors").read_bytes()

    reg.register("writer", _adapter(tmp_path, b"two"), LINEAGE, _card)
    reg.register("writer", _adapter(tmp_path, b"three"), LINEAGE, _card)
    reg.set_production("writer", "v3")
    assert reg.prune("writer", keep=1) == ["v1", "v2"]
    fourth = reg.register("writer", _adapter(tmp_path, b"four"), LINEAGE, _card)

    assert before == b"one"
    assert fourth["version"] == "v4"  # v1 and v2 were pruned, their numbers stay taken
    assert reg.record("writer", "v1")["state"] == "pruned"


def test_the_adapter_store_gets_a_copy_that_serving_reads(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    entry = reg.register(
        "writer", _adapter(tmp_path), LINEAGE, _card, adapter_store=tmp_path / "store"
    )

    copy = tmp_path / "store" / "writer" / "v1"
    assert entry["adapter_uri"] == str(copy)
    assert sorted(p.name for p in copy.iterdir()) == sorted(
        p.name for p in Path(entry["uri"]).iterdir()
    )
    assert json.loads((copy / "lineage.json").read_text())["files"] == entry["files"]


def test_production_pointer_moves_by_compare_and_swap(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    src = _adapter(tmp_path)
    assert reg.production("job-analyzer") is None
    for _ in range(3):
        reg.register("job-analyzer", src, LINEAGE, _card)

    reg.set_production("job-analyzer", "v1", expected=None)
    reg.set_production("job-analyzer", "v2", expected="v1")
    assert Registry(tmp_path / "reg").production("job-analyzer")["version"] == "v2"
    assert reg.pointer("job-analyzer")["previous"] == "v1"

    # A move made against a production that has changed since is refused
    with pytest.raises(ProductionChanged, match="production of job-analyzer is v2, not v1"):
        reg.set_production("job-analyzer", "v3", expected="v1")
    # Repeating a move that is done succeeds (a retried step)
    reg.set_production("job-analyzer", "v2", expected="v1")
    with pytest.raises(RegistryError, match="job-analyzer has no version v9"):
        reg.set_production("job-analyzer", "v9")
    with pytest.raises(RegistryError, match="not of the form v<N>"):
        reg.set_production("job-analyzer", "latest")
    assert reg.production("job-analyzer")["version"] == "v2"


def test_half_registered_versions_are_never_listed(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    src = _adapter(tmp_path)

    # A register that dies after claiming v1, before its files are written
    def dies(version: str) -> str:
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        reg.register("writer", src, LINEAGE, dies)
    # Files that no record names (written by hand, or left by another tool)
    stray = tmp_path / "reg" / "writer" / "v2"
    stray.mkdir(parents=True)
    (stray / "adapter_model.safetensors").write_bytes(b"stray")

    assert reg.record("writer", "v1")["state"] == "pending"
    assert reg.versions("writer") == [] and reg.latest("writer") is None
    with pytest.raises(RegistryError, match="writer v1 is pending"):
        reg.set_production("writer", "v1")
    # The next register takes neither number, and leaves the stray files alone
    assert reg.register("writer", src, LINEAGE, _card)["version"] == "v3"
    assert (stray / "adapter_model.safetensors").read_bytes() == b"stray"
    assert [v["version"] for v in reg.versions("writer")] == ["v3"]


def test_prune_keeps_the_newest_and_every_production_version(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    src = _adapter(tmp_path)
    for _ in range(6):
        reg.register("writer", src, LINEAGE, _card, adapter_store=tmp_path / "store")
    reg.set_production("writer", "v2")  # was production
    reg.set_production("writer", "v3")  # is production

    assert reg.prune("writer", keep=2, dry_run=True) == ["v1", "v4"]
    assert (tmp_path / "reg/writer/v1").is_dir()  # a dry run removes nothing
    assert reg.prune("writer", keep=2) == ["v1", "v4"]

    assert [v["version"] for v in reg.versions("writer")] == ["v2", "v3", "v5", "v6"]
    for gone in ("v1", "v4"):
        assert not (tmp_path / "reg/writer" / gone).exists()
        assert not (tmp_path / "store/writer" / gone).exists()
        assert reg.record("writer", gone)["state"] == "pruned"
    assert (tmp_path / "store/writer/v5/adapter_model.safetensors").is_file()
    assert reg.prune("writer", keep=2) == []
    with pytest.raises(
        RegistryError, match=r"prune must keep at least 1 version \(--keep\), not 0"
    ):
        reg.prune("writer", keep=0)


def test_prune_closes_a_claim_abandoned_by_a_dead_register(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    src = _adapter(tmp_path)
    reg.register("writer", src, LINEAGE, _card)
    # Given v2 claimed longer ago than STALE_CLAIM_S and never finished
    storage = Storage()
    record = reg.record("writer", "v1") | {"version": "v2", "state": "pending"}
    old = STALE_CLAIM_S + 60
    record["claimed_at"] = _stamp_ago(old)
    storage.write_json(tmp_path / "reg/writer/versions/v2.json", record)
    (tmp_path / "reg/writer/v2").mkdir()
    (tmp_path / "reg/writer/v2/adapter_config.json").write_text("{}")

    assert reg.prune("writer", keep=5) == ["v2"]
    assert reg.record("writer", "v2")["state"] == "abandoned"
    assert not (tmp_path / "reg/writer/v2").exists()
    assert [v["version"] for v in reg.versions("writer")] == ["v1"]


def _stamp_ago(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds))


def test_download_fetches_a_version_and_checks_its_digests(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    reg.register("writer", _adapter(tmp_path), LINEAGE, _card)

    got = reg.download("writer", "v1", tmp_path / "copy")
    assert sorted(p.name for p in got.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "lineage.json",
    ]
    # A local registry's folder is used where it is; fetch_adapter does the same for a URI
    assert reg.local_dir("writer", "v1", tmp_path / "unused") == tmp_path / "reg/writer/v1"
    assert fetch_adapter(f"file://{tmp_path}/reg/writer/v1", tmp_path / "unused") == (
        tmp_path / "reg/writer/v1"
    )
    # A version whose weights changed after registering is refused
    (tmp_path / "reg/writer/v1/adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(RegistryError, match=r"writer v1/adapter_model\.safetensors does not match"):
        reg.download("writer", "v1", tmp_path / "copy2")


def test_eight_concurrent_registers_lose_no_version(tmp_path: Path, run_together) -> None:
    reg = Registry(tmp_path / "reg")
    src = _adapter(tmp_path)
    # Each writer its own Registry, as each pod would have
    got = run_together(
        8, lambda i: Registry(tmp_path / "reg").register("writer", src, {"i": i}, _card)
    )
    assert sorted(e["version"] for e in got) == sorted(f"v{n}" for n in range(1, 9))
    listed = reg.versions("writer")
    assert [v["version"] for v in listed] == [f"v{n}" for n in range(1, 9)]
    # Each version holds the lineage of the one call that claimed it
    assert sorted(reg.lineage("writer", v["version"])["i"] for v in listed) == list(range(8))


def test_an_incomplete_adapter_or_bad_name_is_refused_and_nothing_claimed(
    tmp_path: Path,
) -> None:
    src = _adapter(tmp_path)
    (src / "adapter_model.safetensors").unlink()
    reg = Registry(tmp_path / "reg")
    with pytest.raises(RegistryError, match=r"missing adapter_model\.safetensors"):
        reg.register("x", src, {}, _card)
    with pytest.raises(RegistryError, match=r"expert '\.\./x' is not a valid name"):
        reg.versions("../x")
    assert reg.versions("x") == [] and not (tmp_path / "reg" / "x").exists()


# -- the CLI --------------------------------------------------------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", "registry", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_lists_shows_promotes_and_prunes(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    src = _adapter(tmp_path)
    for _ in range(3):
        reg.register("writer", src, LINEAGE, _card)
    reg.set_production("writer", "v1")
    (tmp_path / "fleet.yaml").write_text(
        "name: f\nregistry: {uri: reg}\nexperts:\n"
        "  - {name: writer, task: proposal-writer, seed_data: s.jsonl, eval_data: e.jsonl}\n"
    )

    listed = _cli("list", "--spec", "fleet.yaml", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert data["registry"] == str(tmp_path / "reg")
    assert data["experts"]["writer"]["production"] == "v1"
    assert [v["version"] for v in data["experts"]["writer"]["versions"]] == ["v1", "v2", "v3"]
    table = _cli("list", "--registry", "reg", cwd=tmp_path)
    # the table is a result: stdout (diagnostics only on stderr)
    assert table.returncode == 0 and "production" in table.stdout and "v3" in table.stdout

    shown = _cli("show", "writer", "--registry", "reg", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    shown = json.loads(shown.stdout)
    assert (shown["record"]["version"], shown["production"]) == ("v1", True)
    assert set(shown["lineage"]["files"]) == {"adapter_config.json", "adapter_model.safetensors"}

    promoted = _cli("promote", "writer", "v3", "--expect", "v1", "--registry", "reg", cwd=tmp_path)
    assert promoted.returncode == 0, promoted.stderr
    assert "writer: production v1 -> v3" in promoted.stderr
    assert reg.production("writer")["version"] == "v3"

    dry = _cli("prune", "writer", "--keep", "1", "--dry-run", "--registry", "reg", cwd=tmp_path)
    assert dry.returncode == 0 and "would prune v2" in dry.stderr
    pruned = _cli("prune", "writer", "--keep", "1", "--registry", "reg", cwd=tmp_path)
    assert pruned.returncode == 0 and "pruned v2" in pruned.stderr
    assert [v["version"] for v in reg.versions("writer")] == ["v1", "v3"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("list",), "error: name the registry with one of --spec SPEC or --registry URI"),
        (
            ("promote", "writer", "v3", "--expect", "v2", "--registry", "reg"),
            "production of writer is v1, not v2: not moved to v3",
        ),
        (("promote", "writer", "v7", "--registry", "reg"), "writer has no version v7"),
        (("show", "nobody", "--registry", "reg"), "nobody has no registered version"),
        (
            ("prune", "writer", "--keep", "0", "--registry", "reg"),
            "prune must keep at least 1 version (--keep), not 0",
        ),
        (("list", "--registry", "s3:/bucket"), "malformed URI: write s3://..."),
    ],
)
def test_cli_mistakes_are_one_line_and_exit_2(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    reg = Registry(tmp_path / "reg")
    src = _adapter(tmp_path)
    for _ in range(3):
        reg.register("writer", src, LINEAGE, _card)
    reg.set_production("writer", "v1")

    proc = _cli(*args, cwd=tmp_path)

    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: ") and message in line
    assert reg.production("writer")["version"] == "v1"


def test_pvc_and_file_uris_name_the_same_kind_of_registry(tmp_path: Path) -> None:
    # Given a claim mounted where this step sees it, as the compiled pipeline mounts it
    storage = Storage(pvc_mounts={"models": tmp_path / "mnt"})
    on_claim = Registry("pvc://models/registry", storage)
    entry = on_claim.register("writer", _adapter(tmp_path), LINEAGE, _card)
    on_claim.set_production("writer", "v1")

    assert entry["uri"] == entry["adapter_uri"] == "pvc://models/registry/writer/v1"
    assert (tmp_path / "mnt/registry/writer/v1/lineage.json").is_file()
    assert on_claim.local_dir("writer", "v1", tmp_path / "work") == (
        tmp_path / "mnt/registry/writer/v1"
    )
    # The same folder as a file:// registry
    as_file = Registry(f"file://{tmp_path}/mnt/registry")
    assert as_file.production("writer")["version"] == "v1"
