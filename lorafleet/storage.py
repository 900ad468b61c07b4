"""One storage layer for every location lorafleet reads or writes.

A location is text in one of these forms, parsed by :func:`parse_location` into a
:class:`Location`:

- a local path (``runs/x``, ``/data/x``) or ``file:///data/x``;
- ``s3://BUCKET/KEY``: AWS S3 or any S3-compatible store (MinIO, on-prem);
- ``gs://BUCKET/KEY``: Google Cloud Storage;
- ``pvc://CLAIM/PATH``: a PersistentVolumeClaim, read and written where the current step
  mounts it (``LORAFLEET_PVC_MOUNTS=claim1=/mnt/a,claim2=/mnt/b``, set by the compiled
  pipeline).

:class:`Storage` runs every operation on a location: s3:// and gs:// through fsspec
(s3fs, gcsfs), file:// and pvc:// through the OS. Credentials come from each cloud's
standard chain (botocore: environment, shared config, IRSA web identity, instance or
container role; google-auth: application default credentials, Workload Identity); this
module never reads a key itself. Every failure a user can cause or fix is one
:class:`~lorafleet.errors.StorageError` line, ``URI: reason``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, TypeVar, cast
from urllib.parse import quote

import aiohttp
import botocore.exceptions
import fsspec
import google.auth.exceptions
from fsspec.asyn import sync

from lorafleet.errors import StorageError
from lorafleet.io import sha256_file

__all__ = [
    "PVC_MOUNTS_ENV",
    "SCHEMES",
    "Location",
    "LocationLike",
    "PreconditionFailed",
    "RetryPolicy",
    "Storage",
    "Versioned",
    "is_transient",
    "parse_location",
    "parse_pvc_mounts",
]

PVC_MOUNTS_ENV = "LORAFLEET_PVC_MOUNTS"
"""Environment variable naming where this step mounts each claim: ``claim=/path,...``."""

SCHEMES = ("file", "gs", "pvc", "s3")

Scheme = Literal["file", "gs", "pvc", "s3"]
T = TypeVar("T")

# Files this layer keeps beside the data (temporary files, locks, a directory being
# replaced) start with this; listings and tree copies skip them.
_INTERNAL = ".lorafleet-"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_KNOWN_SCHEME_TYPO = re.compile(r"^(file|gs|pvc|s3):(?!//)", re.IGNORECASE)
# S3 and GCS bucket names: lowercase letters, digits, '.', '-', '_' (GCS), 3 to 222 long.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
# A PersistentVolumeClaim name is a DNS-1123 subdomain.
_CLAIM = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")

_BUCKET_RULE = (
    "bucket names are 3-222 lowercase letters, digits, '.', '-' or '_', "
    "starting and ending with a letter or digit, with no '..'"
)
_CLAIM_RULE = (
    "claim names are Kubernetes names: lowercase letters, digits, '-' and '.', "
    "starting and ending with a letter or digit, with no '..'"
)


def _key_rule(key: str) -> str | None:
    """The containment rule ``key`` breaks, or None when it stays inside its root."""
    if _CONTROL.search(key):
        return "control characters are not allowed in a path"
    if key.startswith("/"):
        return "the path must be relative: no leading '/' and no '//' (empty segment)"
    for segment in key.split("/"):
        if segment == "":
            return "empty path segment ('//' or a trailing '/') is not allowed"
        if segment in (".", ".."):
            return f"'{segment}' segments are not allowed: a path must stay inside its location"
    return None


@dataclass(frozen=True)
class Location:
    """A parsed storage location that every path joined onto stays inside.

    Build one with :func:`parse_location`; constructing one directly checks the same
    rules.

    Attributes:
        scheme: ``file``, ``s3``, ``gs`` or ``pvc``.
        root: The bucket (s3, gs) or claim (pvc); empty for ``file``.
        key: The path inside the root, ``/``-separated, with no leading or trailing ``/``
            and no empty, ``.`` or ``..`` segment; empty for the root itself. For ``file``
            it is the absolute path without its leading ``/``.

    Raises:
        StorageError: If a field breaks the rules above.
    """

    scheme: Scheme
    root: str
    key: str = ""

    def __post_init__(self) -> None:
        shown = f"{self.scheme}://{self.root}/{self.key}"
        if self.scheme not in SCHEMES:
            raise StorageError(
                shown, f"unknown scheme '{self.scheme}' (known: {', '.join(SCHEMES)})"
            )
        if self.scheme == "file" and self.root:
            raise StorageError(shown, "a file location has no bucket or claim")
        if self.scheme in ("s3", "gs") and not (_BUCKET.match(self.root) and ".." not in self.root):
            raise StorageError(shown, f"invalid bucket '{self.root}': {_BUCKET_RULE}")
        if self.scheme == "pvc" and not (_CLAIM.match(self.root) and ".." not in self.root):
            raise StorageError(shown, f"invalid claim '{self.root}': {_CLAIM_RULE}")
        if self.key and (rule := _key_rule(self.key)):
            raise StorageError(shown, rule)

    @property
    def uri(self) -> str:
        """The canonical text form: an absolute path for ``file``, else ``scheme://root/key``."""
        if self.scheme == "file":
            return "/" + self.key
        base = f"{self.scheme}://{self.root}"
        return f"{base}/{self.key}" if self.key else base

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        """The last path segment (empty at the root)."""
        return self.key.rpartition("/")[2]

    @property
    def parent(self) -> Location:
        """The location one segment up; the root is its own parent."""
        return Location(self.scheme, self.root, self.key.rpartition("/")[0])

    def joinpath(self, *parts: str) -> Location:
        """The location of relative ``parts`` inside this one.

        Args:
            *parts: Relative sub-paths, each one or more ``/``-separated segments.

        Returns:
            The joined location, always inside this one.

        Raises:
            StorageError: If a part is empty or absolute, or has an empty, ``.`` or ``..``
                segment or a control character.
        """
        key = self.key
        for part in parts:
            if not isinstance(part, str) or not part:
                raise StorageError(
                    self.uri, f"sub-path {part!r} is refused: it must be non-empty text"
                )
            rule = _key_rule(part)
            if rule:
                raise StorageError(self.uri, f"sub-path {part!r} is refused: {rule}")
            key = f"{key}/{part}" if key else part
        return Location(self.scheme, self.root, key)

    def __truediv__(self, part: str) -> Location:
        return self.joinpath(part)

    def relative_to(self, other: Location) -> str:
        """This location's key relative to ``other``, which must contain it.

        Raises:
            StorageError: If this location is not strictly inside ``other``.
        """
        prefix = f"{other.key}/" if other.key else ""
        if (self.scheme, self.root) != (other.scheme, other.root) or not (
            self.key.startswith(prefix) and len(self.key) > len(prefix)
        ):
            raise StorageError(self.uri, f"is not inside {other.uri}")
        return self.key[len(prefix) :]


LocationLike = str | os.PathLike[str] | Location


def parse_location(text: LocationLike) -> Location:
    """Parse a local path or a ``file://``, ``s3://``, ``gs://`` or ``pvc://`` URI.

    A local path is made absolute (against the working directory) and normalised, so
    ``../data/x`` is a fine local path. URIs are taken literally: their keys must not
    climb (``..``), skip (``//``) or stand still (``.``). A single trailing ``/`` on a URI
    is dropped (``s3://b/runs/`` is the prefix ``s3://b/runs``).

    Args:
        text: The location text, a path-like object, or a parsed location.

    Returns:
        The parsed location.

    Raises:
        StorageError: One line naming the text and the rule it breaks: an empty text,
            control characters, text that is not UTF-8, an unknown scheme, an invalid
            bucket or claim name, or a key that leaves its root.
    """
    if isinstance(text, Location):
        return text
    text = os.fspath(text)
    if not isinstance(text, str):
        raise TypeError(f"a location is text, not {type(text).__name__}")
    if not text:
        raise StorageError("''", "an empty location names nothing")
    if _CONTROL.search(text):
        raise StorageError(text, "control characters are not allowed in a location")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise StorageError(text, "a location must be valid UTF-8 text") from None
    match = _URI.match(text)
    if match is None:
        if _KNOWN_SCHEME_TYPO.match(text):
            scheme = text.partition(":")[0].lower()
            raise StorageError(text, f"malformed URI: write {scheme}://...")
        return Location("file", "", os.path.abspath(text).lstrip("/"))
    scheme, rest = match.group(1).lower(), text[match.end() :]
    if scheme not in SCHEMES:
        raise StorageError(text, f"unknown scheme '{scheme}' (known: {', '.join(SCHEMES)})")
    if scheme == "file":
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        if not rest.startswith("/"):
            raise StorageError(text, "a file URI needs an absolute path: file:///PATH")
        root, key = "", rest[1:]
    else:
        root, _, key = rest.partition("/")
    if key.endswith("/"):
        key = key[:-1]
    try:
        return Location(cast(Scheme, scheme), root, key)
    except StorageError as error:
        raise StorageError(text, error.reason) from None


def parse_pvc_mounts(text: str) -> dict[str, Path]:
    """Parse ``claim1=/mnt/a,claim2=/mnt/b`` (the form of ``LORAFLEET_PVC_MOUNTS``).

    Args:
        text: Comma-separated ``CLAIM=ABSOLUTE_PATH`` entries; blank means no mounts.

    Returns:
        Claim name -> mount path.

    Raises:
        StorageError: If an entry is not ``CLAIM=ABSOLUTE_PATH`` or a claim is invalid.
    """
    mounts: dict[str, Path] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        claim, sep, path = (s.strip() for s in entry.partition("="))
        if not sep or not path.startswith("/"):
            raise StorageError(PVC_MOUNTS_ENV, f"entry {entry!r} must be CLAIM=ABSOLUTE_PATH")
        if not (_CLAIM.match(claim) and ".." not in claim):
            raise StorageError(PVC_MOUNTS_ENV, f"entry {entry!r}: invalid claim: {_CLAIM_RULE}")
        mounts[claim] = Path(path)
    return mounts


class PreconditionFailed(StorageError):
    """A conditional write found the object absent, present or changed against its condition.

    The expected outcome of a lost race: re-read the object and decide again.
    """


@dataclass(frozen=True)
class Versioned:
    """An object's bytes and the opaque version a conditional write can be made against.

    Attributes:
        data: The object's content.
        version: S3: the ETag; GCS: the generation; local: the content's SHA-256.
    """

    data: bytes
    version: str


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff for transient errors (see :func:`is_transient`).

    With the defaults an operation is tried at most 4 times, sleeping about 0.25, 0.5 and
    1 s between tries (each sleep is jittered between half and all of its step): under
    2 s of sleep in all, plus each try's own connect timeout.

    Attributes:
        attempts: Tries in all, the first included (1 disables retrying).
        base_delay: The first step, in seconds; each later step doubles.
        max_delay: The cap on one step, in seconds.
    """

    attempts: int = 4
    base_delay: float = 0.25
    max_delay: float = 2.0

    def delays(self) -> Iterator[float]:
        """Yield the sleep before each retry (``attempts - 1`` of them)."""
        for i in range(self.attempts - 1):
            step = min(self.max_delay, self.base_delay * 2**i)
            yield step / 2 + random.uniform(0, step / 2)


# Error codes and HTTP statuses that mean "try again": throttling, a busy or failing
# server, a timed-out request.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeoutException",
        "500",
        "502",
        "503",
        "504",
    }
)
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_TYPES = (
    ConnectionError,  # resets, refusals, broken pipes
    TimeoutError,  # asyncio and socket timeouts
    botocore.exceptions.ConnectionError,  # endpoint unreachable, connect timeout
    botocore.exceptions.HTTPClientError,  # connection closed, read timeout
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
)
_DENIED_CODES = frozenset(
    {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}
)
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412"})
# Modules whose exceptions are store failures (one line for the user), not lorafleet bugs.
_STORE_MODULES = ("aiobotocore", "aiohttp", "botocore", "fsspec", "gcsfs", "google", "s3fs")


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the chain of exceptions it was raised from."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def _code_and_status(error: BaseException) -> tuple[str | None, int | None]:
    """The store's error code and HTTP status, where the exception carries them."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code, status
    for attribute in ("code", "status"):  # gcsfs HttpError.code, aiohttp .status
        value = getattr(error, attribute, None)
        if isinstance(value, int):
            return str(value), value
    return None, None


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or what it was raised from) is worth retrying.

    Transient: throttling (``SlowDown``, ``Throttling*``, ``TooManyRequests``, HTTP 429),
    server trouble (``InternalError``, ``ServiceUnavailable``, HTTP 500/502/503/504),
    request timeouts (``RequestTimeout``, HTTP 408), and connection failures (resets,
    refusals, closed connections, connect and read timeouts). Everything else (missing
    object or bucket, denied access, failed precondition, bad request) is not.
    """
    for cause in _causes(error):
        if isinstance(cause, _TRANSIENT_TYPES):
            return True
        code, status = _code_and_status(cause)
        if code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS:
            return True
    return False


def _is_store_error(error: BaseException) -> bool:
    if isinstance(
        error, OSError | botocore.exceptions.BotoCoreError | botocore.exceptions.ClientError
    ):
        return True
    return type(error).__module__.split(".")[0] in _STORE_MODULES


def _is_precondition(error: BaseException) -> bool:
    for cause in _causes(error):
        code, status = _code_and_status(cause)
        if code in _PRECONDITION_CODES or status in (409, 412):
            return True
    return isinstance(error, FileExistsError)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_missing(error: BaseException) -> bool:
    """A missing object (not a missing bucket)."""
    codes = {_code_and_status(c)[0] for c in _causes(error)}
    return "NoSuchBucket" not in codes and (
        isinstance(error, FileNotFoundError) or bool(codes & {"NoSuchKey", "404"})
    )


def _explain(error: BaseException, tries: int, missing: str) -> str:
    """One line saying why a store operation failed (``missing``: what a 404 means)."""
    codes = [_code_and_status(c) for c in _causes(error)]
    code = next((c for c, _ in codes if c), None)
    if any(c == "NoSuchBucket" for c, _ in codes):
        return "the bucket does not exist"
    if _is_missing(error):
        return missing
    if isinstance(error, IsADirectoryError):
        return "is a directory, not an object"
    if isinstance(error, NotADirectoryError):
        return "a parent of this path is a file, not a directory"
    if (
        isinstance(error, PermissionError)
        or any(c in _DENIED_CODES or s in (401, 403) for c, s in codes)
        or str(error).startswith("Forbidden")
    ):
        return f"access denied ({code or 'permission'}): {_first_line(error)}"
    if isinstance(error, botocore.exceptions.NoCredentialsError):
        return (
            "no AWS credentials found (environment, shared config, IRSA web identity, "
            "instance or container role)"
        )
    if isinstance(error, google.auth.exceptions.DefaultCredentialsError):
        return "no Google credentials found (application default credentials, Workload Identity)"
    if is_transient(error):
        after = f" after {tries} tries" if tries > 1 else ""
        return f"store unreachable or unavailable{after}: {_first_line(error)}"
    return f"{type(error).__name__}: {_first_line(error)}"


def _sort_key(relative: str) -> bytes:
    # Byte order of the UTF-8 text, as `LC_ALL=C sort` orders paths.
    return relative.encode("utf-8")


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


class _Driver:
    """Primitive operations on one kind of store; :class:`Storage` builds the rest."""

    retries = True
    missing = "no such object"

    def exists(self, loc: Location) -> bool:
        raise NotImplementedError

    def read(self, loc: Location) -> bytes:
        raise NotImplementedError

    def write(self, loc: Location, data: bytes) -> None:
        raise NotImplementedError

    def list(self, loc: Location) -> list[str]:
        raise NotImplementedError

    def get_file(self, loc: Location, dest: Path) -> None:
        raise NotImplementedError

    def put_file(self, source: Path, loc: Location) -> None:
        raise NotImplementedError

    def open_read(self, loc: Location) -> IO[bytes]:
        raise NotImplementedError

    def delete(self, loc: Location) -> None:
        raise NotImplementedError

    def read_versioned(self, loc: Location) -> Versioned:
        raise NotImplementedError

    def write_conditional(self, loc: Location, data: bytes, version: str | None) -> str:
        raise NotImplementedError


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


class _FsspecDriver(_Driver):
    """An object store behind an fsspec filesystem, built on first use."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build
        self._fs: Any = None
        self._lock = threading.Lock()

    @property
    def fs(self) -> Any:
        with self._lock:
            if self._fs is None:
                self._fs = self._build()
            return self._fs

    @staticmethod
    def path(loc: Location) -> str:
        return f"{loc.root}/{loc.key}" if loc.key else loc.root

    def exists(self, loc: Location) -> bool:
        return bool(self.fs.exists(self.path(loc)))

    def read(self, loc: Location) -> bytes:
        return bytes(self.fs.cat_file(self.path(loc)))

    def write(self, loc: Location, data: bytes) -> None:
        self.fs.pipe_file(self.path(loc), data)

    def list(self, loc: Location) -> list[str]:
        prefix = self.path(loc) + "/"
        found = [
            p[len(prefix) :]
            for p in self.fs.find(self.path(loc))
            if p.startswith(prefix) and not p.endswith("/")
        ]
        return sorted(found, key=_sort_key)

    def get_file(self, loc: Location, dest: Path) -> None:
        self.fs.get_file(self.path(loc), str(dest))

    def put_file(self, source: Path, loc: Location) -> None:
        self.fs.put_file(str(source), self.path(loc))

    def open_read(self, loc: Location) -> IO[bytes]:
        return cast(IO[bytes], self.fs.open(self.path(loc), "rb"))

    def delete(self, loc: Location) -> None:
        self.fs.rm_file(self.path(loc))


class _S3Driver(_FsspecDriver):
    """``s3://`` through s3fs; conditional writes are S3's ``If-None-Match``/``If-Match``."""

    def write(self, loc: Location, data: bytes) -> None:
        # One PUT (up to 5 GiB): the object appears whole or not at all.
        self.fs.call_s3("put_object", Bucket=loc.root, Key=loc.key, Body=data)

    def read_versioned(self, loc: Location) -> Versioned:
        fs = self.fs

        async def get() -> Versioned:
            # One GET gives the bytes and the ETag of the same object version (s3fs's
            # public call_s3 would hand back a body that must be read on its loop).
            response = await fs._call_s3("get_object", Bucket=loc.root, Key=loc.key)
            async with response["Body"] as body:
                data = await body.read()
            return Versioned(data, response["ETag"])

        return cast(Versioned, sync(fs.loop, get))

    def write_conditional(self, loc: Location, data: bytes, version: str | None) -> str:
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            response = self.fs.call_s3(
                "put_object", Bucket=loc.root, Key=loc.key, Body=data, **condition
            )
        except Exception as error:
            # 409 ConditionalRequestConflict: another conditional write to the key raced
            # this one; like 412, the caller re-reads and decides again.
            if _is_precondition(error):
                what = "already exists" if version is None else "is absent or has changed"
                raise PreconditionFailed(
                    loc.uri, f"precondition failed: the object {what}"
                ) from None
            raise
        return str(response["ETag"])


class _GCSDriver(_FsspecDriver):
    """``gs://`` through gcsfs; conditional writes are GCS generation preconditions.

    gcsfs retries its own requests (6 tries, backoff up to 32 s between them), so this
    layer does not retry gs:// operations again.
    """

    retries = False
    # gcsfs answers a missing bucket and a missing object with the same 404.
    missing = "no such object (or no such bucket)"

    def read_versioned(self, loc: Location) -> Versioned:
        headers, data = self.fs.call("GET", "b/{}/o/{}", loc.root, loc.key, alt="media")
        return Versioned(bytes(data), str(headers["x-goog-generation"]))

    def write_conditional(self, loc: Location, data: bytes, version: str | None) -> str:
        # One multipart upload (as gcsfs's own uploads) with ifGenerationMatch: 0 means
        # "absent", else the generation read. gcsfs signs the request; `_location` is its
        # endpoint (honouring STORAGE_EMULATOR_HOST).
        url = f"{self.fs._location}/upload/storage/v1/b/{quote(loc.root, safe='')}/o"
        boundary = uuid.uuid4().hex
        head = (
            f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
            f"{json.dumps({'name': loc.key})}\r\n"
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        try:
            out = self.fs.call(
                "POST",
                url,
                uploadType="multipart",
                ifGenerationMatch=version or "0",
                headers={"Content-Type": f'multipart/related; boundary="{boundary}"'},
                data=head.encode() + data + f"\r\n--{boundary}--".encode(),
                json_out=True,
            )
        except FileExistsError:  # gcsfs raises it for 412 Precondition Failed
            what = "already exists" if version is None else "is absent or has changed"
            raise PreconditionFailed(loc.uri, f"precondition failed: the object {what}") from None
        return str(out["generation"])


class Storage:
    """Every operation lorafleet needs on a location, for every kind of store.

    Args:
        pvc_mounts: Claim -> where this step mounts it. Defaults to
            ``LORAFLEET_PVC_MOUNTS`` (``claim1=/mnt/a,claim2=/mnt/b``), read now.
        s3_endpoint_url: The S3 endpoint (MinIO, on-prem, a test server). Defaults to
            ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``, then AWS itself.
        retry: How transient errors are retried (s3:// only: local errors are not
            transient and gcsfs retries gs:// itself).

    Raises:
        StorageError: If ``LORAFLEET_PVC_MOUNTS`` is malformed.
    """

    def __init__(
        self,
        *,
        pvc_mounts: Mapping[str, str | os.PathLike[str]] | None = None,
        s3_endpoint_url: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if pvc_mounts is None:
            self.pvc_mounts = parse_pvc_mounts(os.environ.get(PVC_MOUNTS_ENV, ""))
        else:
            self.pvc_mounts = {claim: Path(path) for claim, path in pvc_mounts.items()}
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
            mount = self.pvc_mounts.get(loc.root)
            if mount is None:
                known = ", ".join(f"{c}={p}" for c, p in sorted(self.pvc_mounts.items())) or "none"
                raise StorageError(
                    loc.uri,
                    f"claim '{loc.root}' is not mounted in this step (mounts known: {known}; "
                    f"set {PVC_MOUNTS_ENV}=CLAIM=PATH,...)",
                )
            return loc, _LocalDriver(mount)
        return loc, self._root

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
