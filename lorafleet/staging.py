"""Stage a fleet spec's local data files in an object store, content-addressed.

A cluster run's pods see KFP artifacts and the profile's object store, never the disk of the
machine that submitted the run. Staging uploads every local data file of a spec (a path or
``file://``) to::

    <store>/data/sha256/<hex sha256 of the file>/<file name>

and returns the spec with those URIs in place of the paths and each file's digest in
``<field>_sha256``, which the validate step checks before it reads a byte. The key is the
content's digest, so an object already there is the same file and is not uploaded again;
two specs that share a file share its object. Data already in a store (``s3://``, ``gs://``,
``pvc://``) is left as written.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.errors import SpecError, StorageError
from lorafleet.fleet import DATA_FIELDS, FleetSpec, is_local_data
from lorafleet.io import sha256_file
from lorafleet.storage import Location, LocationLike, Storage, parse_location

__all__ = ["DATA_PREFIX", "Staged", "data_location", "local_data", "stage_spec"]

DATA_PREFIX = "data/sha256"
"""Where staged data files go under a store: ``<store>/data/sha256/<digest>/<name>``."""


@dataclass(frozen=True)
class Staged:
    """What :func:`stage_spec` did.

    Attributes:
        spec: The spec with every local data file replaced by its URI and digest.
        uploaded: The objects written now.
        present: The objects that were already in the store (same key, same content).
    """

    spec: FleetSpec
    uploaded: list[Location] = field(default_factory=list)
    present: list[Location] = field(default_factory=list)


def local_data(spec: FleetSpec) -> Iterator[tuple[int, str, str]]:
    """Every local data file of ``spec`` (a path or ``file://``), in spec order.

    Yields:
        The expert's index, the field (``seed_data`` or ``eval_data``) and its location:
        ``experts.<index>.<field>`` in the spec.
    """
    for i, expert in enumerate(spec.experts):
        for attr in DATA_FIELDS:
            written = getattr(expert, attr)
            if is_local_data(written):
                yield i, attr, written


def data_location(store: LocationLike, digest: str, name: str) -> Location:
    """The content-addressed location of a data file in ``store``.

    Args:
        store: The store's URI prefix (``s3://bucket/prefix``).
        digest: The file's hex SHA-256.
        name: The file's name (its last path segment).

    Returns:
        ``<store>/data/sha256/<digest>/<name>``.
    """
    return parse_location(store).joinpath(DATA_PREFIX, digest, name)


def stage_spec(
    spec: FleetSpec,
    store: LocationLike,
    storage: Storage | None = None,
    *,
    source: str | Path = "spec",
) -> Staged:
    """Upload every local data file of ``spec`` to ``store`` and point the spec at it.

    Args:
        spec: A loaded spec (:func:`~lorafleet.fleet.load_fleet`: local paths absolute).
        store: The object store's URI prefix: ``s3://``, ``gs://`` or ``pvc://``.
        storage: The storage layer to upload through (default: one configured from the
            environment, e.g. ``AWS_ENDPOINT_URL_S3``).
        source: What names the spec in error messages (its file).

    Returns:
        The staged spec (a copy; ``spec`` is unchanged) and the objects uploaded or found.

    Raises:
        StorageError: If ``store`` is a local path, or an upload fails.
        SpecError: If a data file is missing or differs from the digest the spec gives.
    """
    root = parse_location(store)
    if root.scheme == "file":
        raise StorageError(
            root.uri,
            "data is staged to an object store (s3://, gs:// or pvc://): "
            "the pipeline's pods cannot read this machine's disk",
        )
    storage = storage or Storage()
    staged = spec.model_copy(deep=True)
    done = Staged(staged)
    # Every file is hashed (and checked against the spec) before the first upload, so a
    # mistake leaves the store as it was; each file is hashed and uploaded once, however
    # often the spec uses it.
    digests: dict[Path, str] = {}
    plan = []
    for i, attr, written in list(local_data(staged)):
        expert, where = staged.experts[i], f"experts.{i}.{attr}"
        path = Path(parse_location(written).uri)
        if path not in digests:
            if not path.is_file():
                raise SpecError(source, None, where, f"file not found: {written}")
            digests[path] = sha256_file(path)
        digest, want = digests[path], getattr(expert, f"{attr}_sha256")
        if want is not None and want != digest:
            raise SpecError(
                source,
                None,
                f"{where}_sha256",
                f"{written} has sha256 {digest[:12]}…, the spec says {want[:12]}…",
            )
        plan.append((expert, attr, path, digest))
    for expert, attr, path, digest in plan:
        target = data_location(root, digest, path.name)
        if target not in done.uploaded and target not in done.present:
            if storage.exists(target):
                done.present.append(target)
            else:
                storage.copy_file(path, target)
                done.uploaded.append(target)
        setattr(expert, attr, target.uri)
        setattr(expert, f"{attr}_sha256", digest)
    return done
