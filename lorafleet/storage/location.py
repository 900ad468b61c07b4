"""Locations: the text forms lorafleet reads and writes, parsed and kept inside their root.

:func:`parse_location` turns a local path or a ``file://``, ``s3://``, ``gs://`` or
``pvc://`` URI into a :class:`Location`, refusing any key that would climb (``..``), skip
(``//``) or stand still (``.``); :func:`parse_pvc_mounts` reads where a step mounts each
claim (``LORAFLEET_PVC_MOUNTS``). A claim not listed there is looked for at
``$LORAFLEET_PVC_ROOT/CLAIM`` (default ``/mnt/pvc/CLAIM``) when that directory exists.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from lorafleet.errors import StorageError

__all__ = [
    "DEFAULT_PVC_ROOT",
    "PVC_MOUNTS_ENV",
    "PVC_ROOT_ENV",
    "SCHEMES",
    "Location",
    "LocationLike",
    "parse_location",
    "parse_pvc_mounts",
]

PVC_MOUNTS_ENV = "LORAFLEET_PVC_MOUNTS"
"""Environment variable naming where this step mounts each claim: ``claim=/path,...``."""

PVC_ROOT_ENV = "LORAFLEET_PVC_ROOT"
"""Environment variable naming a directory with one mount per claim, ``ROOT/CLAIM``: where
a claim that ``LORAFLEET_PVC_MOUNTS`` does not list is looked for."""

DEFAULT_PVC_ROOT = Path("/mnt/pvc")
"""The claims' root when ``LORAFLEET_PVC_ROOT`` is unset (the serving runtime's convention)."""

SCHEMES = ("file", "gs", "pvc", "s3")

Scheme = Literal["file", "gs", "pvc", "s3"]

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


def _sort_key(relative: str) -> bytes:
    # Byte order of the UTF-8 text, as `LC_ALL=C sort` orders paths.
    return relative.encode("utf-8")
