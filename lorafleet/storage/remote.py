"""Object-store drivers: ``s3://`` through s3fs and ``gs://`` through gcsfs (fsspec).

Conditional writes use each store's own preconditions: S3's ``If-None-Match`` /
``If-Match`` on the ETag, GCS's ``ifGenerationMatch`` on the generation.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast
from urllib.parse import quote

from fsspec.asyn import sync

from lorafleet.storage.driver import PreconditionFailed, Versioned, _Driver
from lorafleet.storage.location import Location, _sort_key
from lorafleet.storage.retry import _is_precondition

__all__: list[str] = []


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
