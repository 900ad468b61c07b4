"""Local files: atomic writes, staged directory swaps, locks, and the ``file``/``pvc`` driver.

Every write here makes its target appear whole (a temporary file or directory renamed
into place); conditional writes hold a POSIX ``lockf`` lock beside the object, which
works across processes and on NFS-backed claims.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from lorafleet.storage.driver import PreconditionFailed, Versioned, _Driver
from lorafleet.storage.location import Location, _sort_key

__all__: list[str] = []

# Files this layer keeps beside the data (temporary files, locks, a directory being
# replaced) start with this; listings and tree copies skip them.
_INTERNAL = ".lorafleet-"


def _local_files(root: Path) -> list[str]:
    """Relative ``/``-paths of the files under ``root`` (internal files skipped), sorted."""
    if not root.is_dir():
        return []
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(_INTERNAL)]
        base = Path(folder).relative_to(root)
        for name in files:
            if not name.startswith(_INTERNAL):
                found.append((base / name).as_posix())
    return sorted(found, key=_sort_key)


def _fresh_name(folder: Path, kind: str) -> Path:
    return folder / f"{_INTERNAL}{kind}.{uuid.uuid4().hex}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _atomic_put(path: Path, write: Callable[[Path], None]) -> None:
    """Make ``path`` appear whole: ``write`` fills a temporary file that is then renamed.

    The temporary file is created like ``open(path, "w")`` would (mode 0666 less the
    process umask), so shared volumes keep their usual permissions.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_name(path.parent, "tmp")
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


@contextlib.contextmanager
def _staged_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty directory that replaces ``dest`` whole if the block succeeds."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_name(dest.parent, "tmp")
    os.mkdir(tmp)  # 0777 less the umask, unlike tempfile.mkdtemp's 0700
    try:
        yield tmp
        if dest.exists() or dest.is_symlink():
            old = _fresh_name(dest.parent, "old")
            os.rename(dest, old)
            try:
                os.rename(tmp, dest)
            except BaseException:
                os.rename(old, dest)
                raise
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.rename(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# POSIX record locks (lockf) work across processes and on NFS-backed claims but not
# between threads of one process, so each lock file also has a thread lock.
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with _THREAD_LOCKS_GUARD:
        thread_lock = _THREAD_LOCKS.setdefault(str(lock_path), threading.Lock())
    with thread_lock:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock


class _LocalDriver(_Driver):
    """``file://`` and ``pvc://``: a directory tree on this machine under ``base``."""

    retries = False  # a local error does not go away by asking again

    def __init__(self, base: Path) -> None:
        self.base = base

    def path(self, loc: Location) -> Path:
        return self.base.joinpath(*loc.key.split("/")) if loc.key else self.base

    def exists(self, loc: Location) -> bool:
        return self.path(loc).exists()

    def read(self, loc: Location) -> bytes:
        return self.path(loc).read_bytes()

    def write(self, loc: Location, data: bytes) -> None:
        _atomic_put(self.path(loc), lambda tmp: _write_new(tmp, data))

    def list(self, loc: Location) -> list[str]:
        return _local_files(self.path(loc))

    def get_file(self, loc: Location, dest: Path) -> None:
        shutil.copyfile(self.path(loc), dest)

    def put_file(self, source: Path, loc: Location) -> None:
        _atomic_put(self.path(loc), lambda tmp: shutil.copyfile(source, tmp))

    def open_read(self, loc: Location) -> IO[bytes]:
        return open(self.path(loc), "rb")

    def delete(self, loc: Location) -> None:
        self.path(loc).unlink()

    def read_versioned(self, loc: Location) -> Versioned:
        data = self.path(loc).read_bytes()
        return Versioned(data, hashlib.sha256(data).hexdigest())

    def write_conditional(self, loc: Location, data: bytes, version: str | None) -> str:
        path = self.path(loc)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = (
            path.parent / f"{_INTERNAL}lock.{hashlib.sha256(path.name.encode()).hexdigest()[:16]}"
        )
        with _exclusive(lock):
            try:
                current: str | None = hashlib.sha256(path.read_bytes()).hexdigest()
            except FileNotFoundError:
                current = None
            if version is None and current is not None:
                raise PreconditionFailed(loc.uri, "precondition failed: the object already exists")
            if version is not None and current != version:
                state = "is absent" if current is None else "has changed"
                raise PreconditionFailed(loc.uri, f"precondition failed: the object {state}")
            _atomic_put(path, lambda tmp: _write_new(tmp, data))
        return hashlib.sha256(data).hexdigest()
