"""The adapter registry: versioned, fingerprinted adapter directories.

Layout under the registry root::

    <expert>/v<N>/adapter_config.json
                 adapter_model.safetensors
                 README.md        (model card)
                 lineage.json     (base, data and config fingerprints, metrics)
    index.json                    (every version of every expert, and which is in production)

Only local directories are written here; object stores come with the deploy issue.
"""

from __future__ import annotations

import fcntl
import json
import re
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from lorafleet.io import atomic_dir, atomic_write_json

__all__ = ["ADAPTER_FILES", "Registry"]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class Registry:
    """A registry rooted at a local directory."""

    def __init__(self, root: str | Path) -> None:
        if "://" in str(root):
            raise ValueError(
                f"registry {root}: only local directories are supported in this version"
            )
        self.root = Path(root)

    @contextmanager
    def _lock(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def index(self) -> dict:
        path = self.root / "index.json"
        return json.loads(path.read_text()) if path.is_file() else {"experts": {}}

    def _expert(self, index: dict, expert: str) -> dict:
        return index["experts"].setdefault(expert, {"versions": [], "production": None})

    def versions(self, expert: str) -> list[dict]:
        return self._expert(self.index(), expert)["versions"]

    def production(self, expert: str) -> dict | None:
        """The version serving production traffic, or ``None``."""
        entry = self._expert(self.index(), expert)
        return next((v for v in entry["versions"] if v["version"] == entry["production"]), None)

    def set_production(self, expert: str, version: str) -> dict:
        """Mark ``version`` as the expert's production adapter.

        Raises:
            KeyError: if the expert has no such version.
        """
        with self._lock():
            index = self.index()
            entry = self._expert(index, expert)
            found = next((v for v in entry["versions"] if v["version"] == version), None)
            if found is None:
                raise KeyError(f"{expert} has no version {version}")
            entry["production"] = version
            atomic_write_json(self.root / "index.json", index)
        return found

    def latest(self, expert: str) -> dict | None:
        versions = self.versions(expert)
        return versions[-1] if versions else None

    def register(
        self, expert: str, adapter_dir: str | Path, lineage: dict, card: Callable[[str], str]
    ) -> dict:
        """Copy an adapter in as the expert's next version.

        Args:
            expert: the expert's name.
            adapter_dir: a PEFT adapter directory.
            lineage: base/data/config fingerprints and metrics, stored as lineage.json.
            card: builds the model card (README.md) for the version it is given.

        Returns:
            The index entry: ``{"version", "path", "registered_at", "base_fingerprint"}``.

        Raises:
            FileNotFoundError: if the adapter directory lacks a required file.
        """
        adapter_dir = Path(adapter_dir)
        missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{adapter_dir}: missing {', '.join(missing)}")
        with self._lock():
            index = self.index()
            versions = self._expert(index, expert)["versions"]
            numbers = [int(re.sub(r"\D", "", v["version"])) for v in versions]
            version = f"v{max(numbers, default=0) + 1}"
            target = self.root / expert / version
            with atomic_dir(target) as tmp:
                for f in ADAPTER_FILES:
                    shutil.copy2(adapter_dir / f, tmp / f)
                atomic_write_json(
                    tmp / "lineage.json", {**lineage, "expert": expert, "version": version}
                )
                (tmp / "README.md").write_text(card(version))
            entry = {
                "version": version,
                "path": str(target.resolve()),
                "registered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "base_fingerprint": lineage.get("base", {}).get("fingerprint"),
            }
            versions.append(entry)
            atomic_write_json(self.root / "index.json", index)
        return entry
