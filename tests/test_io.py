"""Atomic writes give files and folders the modes the process's umask asks for."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lorafleet.io import atomic_dir, atomic_write_json, atomic_write_text


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request: pytest.FixtureRequest) -> int:
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_and_folders_follow_the_umask(tmp_path: Path, umask: int) -> None:
    # Given a umask, When lorafleet writes a file, a JSON file and a folder atomically
    text = atomic_write_text(tmp_path / "a" / "summary.txt", "hello\n")
    data = atomic_write_json(tmp_path / "index.json", {"experts": {}})
    with atomic_dir(tmp_path / "adapter") as folder:
        (folder / "adapter_config.json").write_text("{}")
    # Then they carry what open() and mkdir() would give: 0666 / 0777 less the umask
    assert text.read_text() == "hello\n" and data.is_file()
    assert _mode(text) == _mode(data) == 0o666 & ~umask
    assert _mode(tmp_path / "adapter") == 0o777 & ~umask
    # and nothing temporary is left beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "adapter", "index.json"]


def test_a_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = atomic_write_text(tmp_path / "f.txt", "old")
    with pytest.raises(TypeError):
        atomic_write_text(target, None)  # type: ignore[arg-type]
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
