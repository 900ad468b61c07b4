"""The adapter registry: immutable, fingerprinted adapter versions on any storage location.

A registry lives wherever the storage layer reaches (a local folder, ``file://``,
``s3://``, ``gs://``, ``pvc://``), laid out as::

    <root>/<expert>/v<N>/adapter_config.json
                         adapter_model.safetensors
                         README.md            (model card)
                         lineage.json         (base, data, config fingerprints, metrics,
                                               and the SHA-256 of each adapter file)
    <root>/<expert>/versions/v<N>.json        (the version record: its state and summary)
    <root>/<expert>/production.json           (the production pointer)

Concurrency comes from the store's conditional writes, never from a lock or a shared
index that writers overwrite:

- A version number is **claimed** by writing its record create-only
  (:meth:`~lorafleet.storage.Storage.create`, ``If-None-Match: *``): of two writers that
  pick the same ``v<N>``, one gets it and the other tries ``v<N+1>``. The record starts
  ``pending``; the files are uploaded; then the record turns ``ready`` (compare-and-swap
  on the version the claim returned). Only ``ready`` versions are listed, so a version
  whose upload died, or files no record names, are never seen.
- Listings come from the records themselves, so no register can erase another's entry.
- The production pointer moves with compare-and-swap
  (:meth:`~lorafleet.storage.Storage.update_json`); :meth:`Registry.set_production` can
  also require the pointer to still name an expected version.
- Records are never deleted: a pruned version keeps its record (``pruned``), so its
  number is never given out again.
"""

from __future__ import annotations

import calendar
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import EllipsisType
from typing import Any

from lorafleet.errors import LorafleetError
from lorafleet.fleet import SLUG
from lorafleet.io import sha256_file
from lorafleet.storage import Location, LocationLike, PreconditionFailed, Storage, parse_location

__all__ = [
    "ADAPTER_FILES",
    "STALE_CLAIM_S",
    "ProductionChanged",
    "Registry",
    "RegistryError",
    "fetch_adapter",
]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
STALE_CLAIM_S = 3600
"""A claim still ``pending`` after this many seconds belongs to a register that died."""

_VERSION = re.compile(r"^v([1-9][0-9]*)$")
_RECORD = re.compile(r"^versions/v([1-9][0-9]*)\.json$")
_FOLDER = re.compile(r"^v([1-9][0-9]*)/")
_CLAIM_ATTEMPTS = 100
_STAMP = "%Y-%m-%dT%H:%M:%SZ"


class RegistryError(LorafleetError):
    """A registry request that cannot be met (unknown version, bad name): one line."""


class ProductionChanged(RegistryError):
    """The production pointer no longer names the version a move was made against."""


def _now() -> str:
    return time.strftime(_STAMP, time.gmtime())


def _age_s(stamp: str) -> float:
    return time.time() - calendar.timegm(time.strptime(stamp, _STAMP))


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _parse(loc: Location, data: bytes) -> dict:
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RegistryError(f"{loc.uri}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise RegistryError(f"{loc.uri}: not a JSON object")
    return value


def fetch_adapter(uri: LocationLike, work_dir: str | Path, storage: Storage | None = None) -> Path:
    """A local directory holding the adapter at ``uri``.

    Args:
        uri: the adapter's folder (a version in a registry or an adapter store).
        work_dir: where a copy goes when ``uri`` is not on this machine.
        storage: the storage layer (default: one configured from the environment).

    Returns:
        The folder itself for a local or ``pvc://`` location (nothing is copied), else a
        download of it into ``work_dir``.

    Raises:
        RegistryError: if a local location is not a directory.
        StorageError: if the location holds nothing or cannot be read.
    """
    storage = storage or Storage()
    loc = parse_location(uri)
    local = storage.local_path(loc)
    if local is not None:
        if not local.is_dir():
            raise RegistryError(f"adapter {loc.uri}: no such directory")
        return local
    return storage.download_tree(loc, Path(work_dir) / (loc.name or "adapter"))


class Registry:
    """The versions of every expert's adapter under one storage location.

    Args:
        uri: the registry's root: a local folder, ``file://``, ``s3://``, ``gs://`` or
            ``pvc://``.
        storage: the storage layer (default: one configured from the environment:
            credentials, ``AWS_ENDPOINT_URL_S3``, ``LORAFLEET_PVC_MOUNTS``).

    Raises:
        StorageError: if ``uri`` is not a valid location.
    """

    def __init__(self, uri: LocationLike, storage: Storage | None = None) -> None:
        self.storage = storage or Storage()
        self.root: Location = parse_location(uri)

    @property
    def uri(self) -> str:
        """The root as text (an absolute path for a local registry)."""
        return self.root.uri

    # -- names and places -----------------------------------------------------------------------

    def _expert_loc(self, expert: str) -> Location:
        if not isinstance(expert, str) or not re.match(SLUG, expert):
            raise RegistryError(
                f"registry {self.uri}: expert {expert!r} is not a valid name "
                "(lowercase letters, digits and '-', at most 63)"
            )
        return self.root / expert

    def _check_version(self, expert: str, version: str) -> None:
        if not isinstance(version, str) or not _VERSION.match(version):
            raise RegistryError(
                f"registry {self.uri}: version {version!r} of {expert} is not of the form v<N>"
            )

    def version_uri(self, expert: str, version: str) -> str:
        """The folder holding one version's files."""
        self._check_version(expert, version)
        return (self._expert_loc(expert) / version).uri

    def _record_loc(self, expert: str, version: str) -> Location:
        self._check_version(expert, version)
        return self._expert_loc(expert) / f"versions/{version}.json"

    def _pointer_loc(self, expert: str) -> Location:
        return self._expert_loc(expert) / "production.json"

    # -- reading --------------------------------------------------------------------------------

    def experts(self) -> list[str]:
        """Every expert with at least one claimed version, sorted."""
        names = set()
        for loc in self.storage.list_prefix(self.root):
            expert, _, rest = loc.relative_to(self.root).partition("/")
            if _RECORD.match(rest):
                names.add(expert)
        return sorted(names)

    def _numbers(self, expert: str) -> list[int]:
        """Every version number in use: claimed by a record, or holding files."""
        base = self._expert_loc(expert)
        numbers = set()
        for loc in self.storage.list_prefix(base):
            match = _RECORD.match(rel := loc.relative_to(base)) or _FOLDER.match(rel)
            if match:
                numbers.add(int(match.group(1)))
        return sorted(numbers)

    def _read_record(self, expert: str, version: str) -> tuple[dict, str] | None:
        loc = self._record_loc(expert, version)
        found = self.storage.read_versioned(loc)
        if found is None:
            return None
        return _parse(loc, found.data), found.version

    def _entry(self, record: dict) -> dict:
        entry = {k: v for k, v in record.items() if k != "state"}
        entry["uri"] = self.version_uri(record["expert"], record["version"])
        return entry

    def record(self, expert: str, version: str) -> dict:
        """A version's record as stored, whatever its state (``pending``, ``ready``,
        ``pruned``, ``abandoned``).

        Raises:
            RegistryError: if no such version was ever claimed.
        """
        found = self._read_record(expert, version)
        if found is None:
            raise RegistryError(f"registry {self.uri}: {expert} has no version {version}")
        return found[0]

    def _ready(self, expert: str, version: str) -> dict:
        record = self.record(expert, version)
        if record["state"] != "ready":
            raise RegistryError(
                f"registry {self.uri}: {expert} {version} is {record['state']}, not a registered version"
            )
        return record

    def get(self, expert: str, version: str) -> dict:
        """One registered version, as :meth:`versions` lists it.

        Raises:
            RegistryError: if the version does not exist or is not ``ready``.
        """
        return self._entry(self._ready(expert, version))

    def versions(self, expert: str) -> list[dict]:
        """The expert's registered versions, oldest first.

        Returns:
            One entry per ``ready`` version: ``{"expert", "version", "claimed_at",
            "registered_at", "base_fingerprint", "files", "adapter_uri", "uri"}`` and
            ``"production_since"`` for a version that was ever production.
        """
        entries = []
        for number in self._numbers(expert):
            found = self._read_record(expert, f"v{number}")
            if found and found[0]["state"] == "ready":
                entries.append(self._entry(found[0]))
        return entries

    def latest(self, expert: str) -> dict | None:
        """The newest registered version, or ``None``."""
        for number in reversed(self._numbers(expert)):
            found = self._read_record(expert, f"v{number}")
            if found and found[0]["state"] == "ready":
                return self._entry(found[0])
        return None

    def pointer(self, expert: str) -> dict | None:
        """The production pointer as stored (``{"expert", "version", "previous",
        "updated_at"}``), or ``None`` when the expert has no production version."""
        loc = self._pointer_loc(expert)
        found = self.storage.read_versioned(loc)
        return _parse(loc, found.data) if found else None

    def production(self, expert: str) -> dict | None:
        """The version serving production traffic, or ``None``.

        Raises:
            RegistryError: if the pointer names a version that is not registered.
        """
        pointer = self.pointer(expert)
        return self.get(expert, pointer["version"]) if pointer else None

    def lineage(self, expert: str, version: str) -> dict:
        """A registered version's ``lineage.json``."""
        self._ready(expert, version)
        return self.storage.read_json(self._expert_loc(expert) / version / "lineage.json")

    # -- files ----------------------------------------------------------------------------------

    def download(self, expert: str, version: str, dest: str | Path) -> Path:
        """Copy a registered version's files into the local directory ``dest``.

        The adapter files are checked against the digests in the version's record.

        Returns:
            ``dest`` as an absolute path.

        Raises:
            RegistryError: if the version is not registered, or a file's digest differs.
            StorageError: if the download fails.
        """
        record = self._ready(expert, version)
        path = self.storage.download_tree(self.version_uri(expert, version), dest)
        for name, digest in record["files"].items():
            if sha256_file(path / name) != digest:
                raise RegistryError(
                    f"registry {self.uri}: {expert} {version}/{name} does not match its recorded sha256"
                )
        return path

    def local_dir(self, expert: str, version: str, work_dir: str | Path) -> Path:
        """A local directory with a registered version's files: the version's own folder
        in a local or ``pvc://`` registry, else a download (checked, see :meth:`download`)
        into ``work_dir``."""
        self._ready(expert, version)
        local = self.storage.local_path(self.version_uri(expert, version))
        if local is not None:
            return local
        return self.download(expert, version, Path(work_dir) / expert / version)

    # -- writing --------------------------------------------------------------------------------

    def _claim(self, expert: str, fields: dict) -> tuple[dict, str]:
        """Create the next free version's record; returns (the record, its etag)."""
        number = max(self._numbers(expert), default=0) + 1
        for _ in range(_CLAIM_ATTEMPTS):
            record = {"expert": expert, "version": f"v{number}", **fields}
            try:
                loc = self._record_loc(expert, record["version"])
                return record, self.storage.create(loc, _json(record))
            except PreconditionFailed:
                number += 1  # another writer claimed it first
        raise RegistryError(
            f"registry {self.uri}: gave up claiming a version of {expert} after {_CLAIM_ATTEMPTS} taken numbers"
        )

    def register(
        self,
        expert: str,
        adapter_dir: str | Path,
        lineage: dict,
        card: Callable[[str], str],
        *,
        adapter_store: LocationLike | None = None,
    ) -> dict:
        """Add an adapter as the expert's next version (``v1``, ``v2``, ...).

        Safe to call from many processes or pods at once: each call gets its own version.

        Args:
            expert: the expert's name.
            adapter_dir: a local PEFT adapter directory.
            lineage: base/data/config fingerprints and metrics, stored as ``lineage.json``
                with ``expert``, ``version`` and ``files`` (file name -> SHA-256 of
                adapter_config.json and adapter_model.safetensors) added.
            card: builds the model card (README.md) for the version it is given.
            adapter_store: also copy the version's files to
                ``<adapter_store>/<expert>/<version>`` (what serving reads) before the
                version is listed.

        Returns:
            The new version's entry (see :meth:`versions`); ``adapter_uri`` is where
            serving reads it: the adapter store's copy, else the registry's own folder.

        Raises:
            RegistryError: if the adapter directory lacks a required file or the expert's
                name is invalid; nothing is claimed then.
            StorageError: if the registry or adapter store cannot be written (the claim
                stays ``pending``, never listed; :meth:`prune` closes it later).
        """
        adapter_dir = Path(adapter_dir)
        expert_loc = self._expert_loc(expert)
        missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
        if missing:
            raise RegistryError(f"adapter {adapter_dir}: missing {', '.join(missing)}")
        files = {f: sha256_file(adapter_dir / f) for f in ADAPTER_FILES}
        base_fingerprint = (lineage.get("base") or {}).get("fingerprint")
        claim, etag = self._claim(
            expert,
            {
                "state": "pending",
                "claimed_at": _now(),
                "base_fingerprint": base_fingerprint,
                "files": files,
            },
        )
        version = claim["version"]
        target = expert_loc / version
        store = None if adapter_store is None else parse_location(adapter_store)
        if store == self.root:
            store = None
        with tempfile.TemporaryDirectory(prefix="lorafleet-register-") as tmp:
            staged = Path(tmp)
            for f in ADAPTER_FILES:
                shutil.copyfile(adapter_dir / f, staged / f)
            (staged / "lineage.json").write_bytes(
                _json({**lineage, "expert": expert, "version": version, "files": files})
            )
            (staged / "README.md").write_text(card(version), encoding="utf-8")
            self.storage.upload_tree(staged, target)
            if store is not None:
                self.storage.upload_tree(staged, store / expert / version)
        record = {
            **claim,
            "state": "ready",
            "registered_at": _now(),
            "adapter_uri": (store / expert / version).uri if store else target.uri,
        }
        try:
            self.storage.compare_and_swap(self._record_loc(expert, version), _json(record), etag)
        except PreconditionFailed:
            raise RegistryError(
                f"registry {self.uri}: the claim on {expert} {version} was closed while its files "
                f"were written (pending over {STALE_CLAIM_S} s?); register again"
            ) from None
        return self._entry(record)

    def _mark_production(self, expert: str, version: str) -> dict:
        """Note on the record that ``version`` became production (so prune keeps it)."""
        for _ in range(_CLAIM_ATTEMPTS):
            found = self._read_record(expert, version)
            if found is None:
                raise RegistryError(f"registry {self.uri}: {expert} has no version {version}")
            record, etag = found
            if record["state"] != "ready":
                raise RegistryError(
                    f"registry {self.uri}: {expert} {version} is {record['state']}, not a registered version"
                )
            if record.get("production_since"):
                return record
            record = {**record, "production_since": _now()}
            try:
                self.storage.compare_and_swap(
                    self._record_loc(expert, version), _json(record), etag
                )
                return record
            except PreconditionFailed:
                continue  # a prune or another promotion wrote it: look again
        raise RegistryError(f"registry {self.uri}: {expert} {version} kept changing; try again")

    def set_production(
        self, expert: str, version: str, *, expected: str | EllipsisType | None = ...
    ) -> dict:
        """Point the expert's production at ``version`` (compare-and-swap on the pointer).

        Args:
            expert: the expert.
            version: a registered version.
            expected: move only if production is still this version (``None``: only if
                there is none yet); the default ``...`` moves from any version. Setting
                the version production already names always succeeds.

        Returns:
            The version's entry.

        Raises:
            RegistryError: if the version is not registered.
            ProductionChanged: if production is no longer ``expected``.
        """
        self._check_version(expert, version)
        if expected is not ...:
            self._expect(expert, version, expected, self.pointer(expert))
        record = self._mark_production(expert, version)

        def change(current: dict | None) -> dict:
            if expected is not ...:
                self._expect(expert, version, expected, current)
            previous = current["version"] if current else None
            if previous == version:
                return current
            return {
                "expert": expert,
                "version": version,
                "previous": previous,
                "updated_at": _now(),
            }

        self.storage.update_json(self._pointer_loc(expert), change)
        return self._entry(record)

    def _expect(
        self, expert: str, version: str, expected: str | None, current: dict | None
    ) -> None:
        now = current["version"] if current else None
        if now not in (expected, version):
            raise ProductionChanged(
                f"registry {self.uri}: production of {expert} is {now or 'unset'}, not "
                f"{expected or 'unset'}: not moved to {version}"
            )

    def _remove_files(self, loc: Location) -> None:
        local = self.storage.local_path(loc)
        if local is not None:
            shutil.rmtree(local, ignore_errors=True)
            return
        for item in self.storage.list_prefix(loc):
            self.storage.delete(item)

    def prune(self, expert: str, keep: int, *, dry_run: bool = False) -> list[str]:
        """Delete the files of old versions.

        Kept: the ``keep`` newest registered versions, the production version, and every
        version that was ever production (its record has ``production_since``), so a
        rollback target is never lost. A pruned version's files go (also its copy in the
        adapter store), its record stays as ``pruned``, so its number is never reused.
        Claims left ``pending`` for over :data:`STALE_CLAIM_S` (a register that died) are
        closed as ``abandoned`` and their files removed too.

        Args:
            expert: the expert.
            keep: how many of the newest versions to keep (at least 1).
            dry_run: only say what would go.

        Returns:
            The versions pruned or abandoned (or that would be), oldest first.

        Raises:
            RegistryError: if ``keep`` is below 1.
        """
        if keep < 1:
            raise RegistryError(
                f"registry {self.uri}: prune must keep at least 1 version (--keep), not {keep}"
            )
        pointer = self.pointer(expert)
        found = {
            f"v{n}": r for n in self._numbers(expert) if (r := self._read_record(expert, f"v{n}"))
        }
        ready = [v for v, (rec, _) in found.items() if rec["state"] == "ready"]
        kept = set(ready[-keep:]) | ({pointer["version"]} if pointer else set())
        doomed = [
            v
            for v, (rec, _) in found.items()
            if (rec["state"] == "ready" and v not in kept and not rec.get("production_since"))
            or (rec["state"] == "pending" and _age_s(rec["claimed_at"]) > STALE_CLAIM_S)
        ]
        if dry_run:
            return doomed
        removed = []
        for version in doomed:
            record, etag = found[version]
            state = "pruned" if record["state"] == "ready" else "abandoned"
            closed = {**record, "state": state, f"{state}_at": _now()}
            try:
                self.storage.compare_and_swap(
                    self._record_loc(expert, version), _json(closed), etag
                )
            except PreconditionFailed:
                continue  # promoted or finished meanwhile: keep it
            folder = self.version_uri(expert, version)
            self._remove_files(parse_location(folder))
            store_copy = record.get("adapter_uri") or ""
            if store_copy.endswith(f"/{expert}/{version}") and store_copy != folder:
                self._remove_files(parse_location(store_copy))
            removed.append(version)
        return removed
