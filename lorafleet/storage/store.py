"""The :class:`Storage` facade: every operation lorafleet needs, on every kind of store.

It picks the driver for a location (:mod:`~lorafleet.storage.local` for ``file``/``pvc``,
:mod:`~lorafleet.storage.remote` for ``s3``/``gs``), retries transient errors
(:mod:`~lorafleet.storage.retry`) and turns every store failure into one
:class:`~lorafleet.errors.StorageError` line.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import fsspec

from lorafleet.errors import StorageError
from lorafleet.io import sha256_file
from lorafleet.storage.driver import PreconditionFailed, Versioned, _Driver
from lorafleet.storage.local import _INTERNAL, _local_files, _LocalDriver, _staged_dir
from lorafleet.storage.location import (
    DEFAULT_PVC_ROOT,
    PVC_MOUNTS_ENV,
    PVC_ROOT_ENV,
    Location,
    LocationLike,
    parse_location,
    parse_pvc_mounts,
)
from lorafleet.storage.remote import _GCSDriver, _S3Driver
from lorafleet.storage.retry import (
    RetryPolicy,
    _explain,
    _is_missing,
    _is_store_error,
    is_transient,
)

__all__ = ["Storage"]

T = TypeVar("T")


class Storage:
    """Every operation lorafleet needs on a location, for every kind of store.

    Args:
        pvc_mounts: Claim -> where this step mounts it. Defaults to
            ``LORAFLEET_PVC_MOUNTS`` (``claim1=/mnt/a,claim2=/mnt/b``), read now.
        pvc_root: Where a claim not in ``pvc_mounts`` is looked for: ``pvc_root/CLAIM``,
            used when that directory exists. Defaults to ``LORAFLEET_PVC_ROOT``, read
            now, then ``/mnt/pvc``.
        s3_endpoint_url: The S3 endpoint (MinIO, on-prem, a test server). Defaults to
            ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``, then AWS itself.
        retry: How transient errors are retried (s3:// only: local errors are not
            transient and gcsfs retries gs:// itself).

    Raises:
        StorageError: If ``LORAFLEET_PVC_MOUNTS`` is malformed or the pvc root is not an
            absolute path.
    """

    def __init__(
        self,
        *,
        pvc_mounts: Mapping[str, str | os.PathLike[str]] | None = None,
        pvc_root: str | os.PathLike[str] | None = None,
        s3_endpoint_url: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if pvc_mounts is None:
            self.pvc_mounts = parse_pvc_mounts(os.environ.get(PVC_MOUNTS_ENV, ""))
        else:
            self.pvc_mounts = {claim: Path(path) for claim, path in pvc_mounts.items()}
        root = pvc_root if pvc_root is not None else os.environ.get(PVC_ROOT_ENV, "").strip()
        self.pvc_root = Path(root) if root else DEFAULT_PVC_ROOT
        if not self.pvc_root.is_absolute():
            shown = PVC_ROOT_ENV if pvc_root is None else "pvc_root"
            raise StorageError(shown, f"{str(root)!r} must be an absolute path")
        self.s3_endpoint_url = (
            s3_endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )
        self.retry = retry or RetryPolicy()
        self._s3 = _S3Driver(self._build_s3)
        self._gcs = _GCSDriver(self._build_gcs)
        self._root = _LocalDriver(Path("/"))

    def _build_s3(self) -> Any:
        fs = fsspec.filesystem(
            "s3",
            endpoint_url=self.s3_endpoint_url,
            skip_instance_cache=True,
            # Other writers (other steps) change the bucket: never answer from a cache.
            use_listings_cache=False,
            # This layer retries (RetryPolicy); botocore's and s3fs's own tries would multiply.
            config_kwargs={"retries": {"total_max_attempts": 1}, "connect_timeout": 10},
        )
        fs.retries = 1
        return fs

    def _build_gcs(self) -> Any:
        # Against an emulator (STORAGE_EMULATOR_HOST) there are no credentials to find.
        token = "anon" if os.environ.get("STORAGE_EMULATOR_HOST") else "google_default"
        return fsspec.filesystem(
            "gcs", token=token, skip_instance_cache=True, use_listings_cache=False
        )

    def _resolve(self, where: LocationLike) -> tuple[Location, _Driver]:
        loc = parse_location(where)
        if loc.scheme == "s3":
            return loc, self._s3
        if loc.scheme == "gs":
            return loc, self._gcs
        if loc.scheme == "pvc":
            return loc, _LocalDriver(self._claim_mount(loc))
        return loc, self._root

    def _claim_mount(self, loc: Location) -> Path:
        """Where this step mounts ``loc``'s claim: its ``pvc_mounts`` entry, else
        ``pvc_root/CLAIM`` if that directory exists."""
        mount = self.pvc_mounts.get(loc.root)
        if mount is not None:
            return mount
        # A claim name has no '/' and no '..', so this stays inside the root.
        fallback = self.pvc_root / loc.root
        if fallback.is_dir():
            return fallback
        known = ", ".join(f"{c}={p}" for c, p in sorted(self.pvc_mounts.items())) or "none"
        raise StorageError(
            loc.uri,
            f"claim '{loc.root}' is not mounted in this step (mounts known: {known}; "
            f"set {PVC_MOUNTS_ENV}=CLAIM=PATH,... or mount it at {fallback})",
        )

    def _run(
        self, loc: Location, driver: _Driver, action: Callable[[], T], *, retry: bool = True
    ) -> T:
        """Run ``action`` on ``loc``, retrying transient errors, failing in one line."""
        delays = self.retry.delays() if retry and driver.retries else iter(())
        tries = 0
        while True:
            tries += 1
            try:
                return action()
            except StorageError:
                raise
            except Exception as error:
                if not _is_store_error(error):
                    raise
                if is_transient(error):
                    delay = next(delays, None)
                    if delay is not None:
                        time.sleep(delay)
                        continue
                raise StorageError(loc.uri, _explain(error, tries, driver.missing)) from error

    @staticmethod
    def _need_key(loc: Location) -> None:
        if not loc.key:
            raise StorageError(loc.uri, "names a bucket, claim or '/' itself, not an object in it")

    def local_path(self, where: LocationLike) -> Path | None:
        """Where a ``file://`` or ``pvc://`` location lies on this machine; None for s3/gs.

        Raises:
            StorageError: If the location is invalid or its claim is not mounted.
        """
        loc, driver = self._resolve(where)
        return driver.path(loc) if isinstance(driver, _LocalDriver) else None

    def exists(self, where: LocationLike) -> bool:
        """Whether an object, or a prefix (directory) holding objects, is at ``where``.

        False for a missing bucket too; a read or write there names the missing bucket.
        """
        loc, driver = self._resolve(where)
        return self._run(loc, driver, lambda: driver.exists(loc))

    def read_bytes(self, where: LocationLike) -> bytes:
        """The whole object at ``where``.

        Raises:
            StorageError: If it is missing, its bucket is missing, access is denied or
                the store is unreachable.
        """
        loc, driver = self._resolve(where)
        self._need_key(loc)
        return self._run(loc, driver, lambda: driver.read(loc))

    def read_text(self, where: LocationLike) -> str:
        """The object at ``where`` as UTF-8 text."""
        loc = parse_location(where)
        try:
            return self.read_bytes(loc).decode("utf-8")
        except UnicodeDecodeError as error:
            raise StorageError(loc.uri, f"not UTF-8 text (byte {error.start})") from None

    def read_json(self, where: LocationLike) -> Any:
        """The object at ``where`` parsed as JSON."""
        loc = parse_location(where)
        text = self.read_text(loc)
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise StorageError(
                loc.uri, f"not valid JSON (line {error.lineno}, column {error.colno}): {error.msg}"
            ) from None

    def write_bytes(self, where: LocationLike, data: bytes) -> Location:
        """Replace the object at ``where`` with ``data``, atomically.

        Local: a temporary file (mode 0666 less the umask) renamed over the target.
        Object stores: one PUT. Readers see the old object or the whole new one.

        Returns:
            The location written.
        """
        loc, driver = self._resolve(where)
        self._need_key(loc)
        self._run(loc, driver, lambda: driver.write(loc, bytes(data)))
        return loc

    def write_text(self, where: LocationLike, text: str) -> Location:
        """Write ``text`` as UTF-8, atomically (see :meth:`write_bytes`)."""
        return self.write_bytes(where, text.encode("utf-8"))

    def write_json(self, where: LocationLike, obj: Any) -> Location:
        """Write ``obj`` as indented JSON (keys in insertion order), atomically."""
        return self.write_bytes(where, _json_bytes(parse_location(where), obj))

    def delete(self, where: LocationLike) -> None:
        """Remove the object at ``where``.

        Raises:
            StorageError: If it is missing (or see :meth:`read_bytes`).
        """
        loc, driver = self._resolve(where)
        self._need_key(loc)
        self._run(loc, driver, lambda: driver.delete(loc))

    def list_prefix(self, where: LocationLike) -> list[Location]:
        """Every object under the prefix (directory) ``where``, at any depth.

        Returns:
            Their locations, sorted by path bytes; empty for a missing or empty prefix.

        Raises:
            StorageError: If an object's key would leave the prefix (``..``, ``//``) when
                laid out as a path, or see :meth:`read_bytes`.
        """
        loc, driver = self._resolve(where)
        return [loc.joinpath(rel) for rel in self._run(loc, driver, lambda: driver.list(loc))]

    def _tree(self, loc: Location, driver: _Driver) -> list[str]:
        """Relative paths of the objects under ``loc``; at least one, all contained."""
        relatives = self._run(loc, driver, lambda: driver.list(loc))
        if not relatives:
            raise StorageError(loc.uri, "no objects under this prefix")
        for rel in relatives:
            loc.joinpath(rel)  # refuses a key that would climb out of the tree
        return relatives

    def upload_tree(self, source_dir: str | os.PathLike[str], dest: LocationLike) -> list[Location]:
        """Make ``dest`` hold exactly the files under the local ``source_dir``.

        Local and pvc destinations are replaced whole (built beside, then renamed in).
        On object stores each file is one upload, then objects under ``dest`` that the
        tree does not have are removed; there the tree is not atomic, so write a pointer
        to it (:meth:`create`, :meth:`compare_and_swap`) only after this returns.

        Returns:
            The locations of the uploaded files, sorted.

        Raises:
            StorageError: If ``source_dir`` is not a directory or holds no files, or an
                upload fails (see :meth:`read_bytes`).
        """
        source = Path(source_dir).absolute()
        loc, driver = self._resolve(dest)
        relatives = _local_files(source)
        if not relatives:
            raise StorageError(str(source), "not a directory with files to upload")
        targets = [loc.joinpath(rel) for rel in relatives]
        if isinstance(driver, _LocalDriver):

            def copy_in() -> None:
                with _staged_dir(driver.path(loc)) as tmp:
                    for rel in relatives:
                        target = tmp.joinpath(*rel.split("/"))
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(source.joinpath(*rel.split("/")), target)

            self._run(loc, driver, copy_in)
            return targets
        for rel, target in zip(relatives, targets, strict=True):
            file = source.joinpath(*rel.split("/"))
            self._run(target, driver, lambda f=file, t=target: driver.put_file(f, t))
        for stale in sorted(set(self._run(loc, driver, lambda: driver.list(loc))) - set(relatives)):
            self._run(loc / stale, driver, lambda s=stale: driver.delete(loc / s))
        return targets

    def download_tree(self, source: LocationLike, dest_dir: str | os.PathLike[str]) -> Path:
        """Copy every object under ``source`` into the local directory ``dest_dir``.

        The files land in a temporary directory beside ``dest_dir`` that then replaces
        it whole: a failed download leaves nothing half-written.

        Returns:
            ``dest_dir`` as an absolute path.

        Raises:
            StorageError: If ``source`` holds no objects, a key would leave the tree, or a
                download fails (see :meth:`read_bytes`).
        """
        loc, driver = self._resolve(source)
        relatives = self._tree(loc, driver)
        dest = Path(dest_dir).absolute()
        with _staged_dir(dest) as tmp:
            for rel in relatives:
                target = tmp.joinpath(*rel.split("/"))
                item = loc / rel

                def fetch(item: Location = item, target: Path = target) -> None:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    driver.get_file(item, target)

                self._run(item, driver, fetch)
        return dest

    def copy_file(self, source: LocationLike, dest: LocationLike) -> Location:
        """Copy one object between any two locations (``dest`` is replaced atomically).

        Returns:
            The destination location.
        """
        src, src_driver = self._resolve(source)
        dst, dst_driver = self._resolve(dest)
        self._need_key(src)
        self._need_key(dst)
        if isinstance(src_driver, _LocalDriver):
            path = src_driver.path(src)
            self._run(dst, dst_driver, lambda: dst_driver.put_file(path, dst))
            return dst
        with tempfile.TemporaryDirectory(prefix=_INTERNAL) as tmp:
            staged = Path(tmp) / "object"
            self._run(src, src_driver, lambda: src_driver.get_file(src, staged))
            self._run(dst, dst_driver, lambda: dst_driver.put_file(staged, dst))
        return dst

    def copy_tree(self, source: LocationLike, dest: LocationLike) -> list[Location]:
        """Copy every object under ``source`` to ``dest`` (see :meth:`upload_tree`).

        Returns:
            The locations of the copied objects, sorted.
        """
        src, src_driver = self._resolve(source)
        if isinstance(src_driver, _LocalDriver):
            self._tree(src, src_driver)
            return self.upload_tree(src_driver.path(src), dest)
        with tempfile.TemporaryDirectory(prefix=_INTERNAL) as tmp:
            return self.upload_tree(self.download_tree(src, Path(tmp) / "tree"), dest)

    def digest(self, where: LocationLike) -> str:
        """Hex SHA-256 of the object at ``where``, streamed."""
        loc, driver = self._resolve(where)
        self._need_key(loc)
        if isinstance(driver, _LocalDriver):
            return self._run(loc, driver, lambda: sha256_file(driver.path(loc)))

        def stream() -> str:
            h = hashlib.sha256()
            with driver.open_read(loc) as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
            return h.hexdigest()

        return self._run(loc, driver, stream)

    def tree_digest(self, where: LocationLike) -> str:
        """Hex SHA-256 of a tree, the same on every store.

        It is the SHA-256 of one line ``<file sha256>  <relative path>\\n`` per object,
        sorted by path bytes: the output of ``sha256sum`` over the tree's files in
        ``LC_ALL=C`` order, paths relative to its root (docs/storage.md has the command).

        Raises:
            StorageError: If ``where`` holds no objects (see :meth:`download_tree`).
        """
        loc, driver = self._resolve(where)
        h = hashlib.sha256()
        for rel in self._tree(loc, driver):
            h.update(f"{self.digest(loc / rel)}  {rel}\n".encode())
        return h.hexdigest()

    def read_versioned(self, where: LocationLike) -> Versioned | None:
        """The object at ``where`` with its version, or None if there is none.

        Raises:
            StorageError: If the bucket is missing, access is denied or the store is
                unreachable.
        """
        loc, driver = self._resolve(where)
        self._need_key(loc)

        def read() -> Versioned | None:
            try:
                return driver.read_versioned(loc)
            except Exception as error:
                if _is_missing(error):
                    return None
                raise

        return self._run(loc, driver, read)

    def create(self, where: LocationLike, data: bytes) -> str:
        """Write ``data`` only if no object is at ``where`` (``If-None-Match: *``).

        S3: a conditional PUT; GCS: ``ifGenerationMatch=0``; local: under an ``lockf``
        lock beside the file. A conditional write is tried once: after a lost response
        its outcome is unknown, so that is reported, not repeated.

        Returns:
            The new object's version.

        Raises:
            PreconditionFailed: If an object is already there.
            StorageError: If the write fails otherwise.
        """
        loc, driver = self._resolve(where)
        self._need_key(loc)
        return self._run(
            loc, driver, lambda: driver.write_conditional(loc, bytes(data), None), retry=False
        )

    def compare_and_swap(self, where: LocationLike, data: bytes, version: str) -> str:
        """Replace the object at ``where`` only if it still has ``version`` (``If-Match``).

        Args:
            where: The object, typically a small pointer.
            data: The new content.
            version: The version :meth:`read_versioned` returned.

        Returns:
            The new object's version.

        Raises:
            PreconditionFailed: If the object is absent or has another version.
            StorageError: If the write fails otherwise (see :meth:`create`).
        """
        loc, driver = self._resolve(where)
        self._need_key(loc)
        return self._run(
            loc, driver, lambda: driver.write_conditional(loc, bytes(data), version), retry=False
        )

    def update_json(
        self, where: LocationLike, change: Callable[[Any], Any], *, attempts: int = 16
    ) -> Any:
        """Read-modify-write a JSON object with no lost update between concurrent writers.

        Reads the object (None when absent), writes ``change(value)`` with
        :meth:`create` or :meth:`compare_and_swap`, and on a lost race re-reads and
        calls ``change`` again, after a short jittered pause.

        Args:
            where: The JSON object.
            change: Computes the new value from the current one (None when absent);
                may be called several times.
            attempts: Tries before giving up.

        Returns:
            The value written.

        Raises:
            StorageError: After ``attempts`` lost races, or if a read or write fails.
        """
        loc = parse_location(where)
        for attempt in range(attempts):
            current = self.read_versioned(loc)
            value = None
            if current is not None:
                try:
                    value = json.loads(current.data)
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    raise StorageError(loc.uri, f"not valid JSON: {error}") from None
            new = change(value)
            payload = _json_bytes(loc, new)
            try:
                if current is None:
                    self.create(loc, payload)
                else:
                    self.compare_and_swap(loc, payload, current.version)
                return new
            except PreconditionFailed:
                time.sleep(random.uniform(0, min(0.5, 0.01 * 2**attempt)))
        raise StorageError(loc.uri, f"gave up after {attempts} updates lost to concurrent writers")


def _json_bytes(loc: Location, obj: Any) -> bytes:
    try:
        text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise StorageError(loc.uri, f"cannot be written as JSON: {error}") from None
    return (text + "\n").encode("utf-8")
