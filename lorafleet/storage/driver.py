"""The primitive operations every store implements, and what conditional reads return.

:class:`Storage <lorafleet.storage.store.Storage>` builds every operation on these
primitives; :mod:`lorafleet.storage.local` and :mod:`lorafleet.storage.remote` implement
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import IO

from lorafleet.errors import StorageError
from lorafleet.storage.location import Location

__all__ = ["PreconditionFailed", "Versioned"]


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
