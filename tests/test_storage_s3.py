"""The storage layer against a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
import threading
import time
import uuid
from pathlib import Path

import boto3
import pytest

from lorafleet.errors import StorageError
from lorafleet.storage import Location, PreconditionFailed, RetryPolicy, Storage, parse_location

from .conftest import S3_BUCKET as BUCKET

pytestmark = pytest.mark.integration

FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)


@pytest.fixture
def storage(s3_endpoint: str) -> Storage:
    return Storage(s3_endpoint_url=s3_endpoint, pvc_mounts={}, retry=FAST_RETRY)


@pytest.fixture
def prefix() -> Location:
    """A fresh prefix in the bucket for each test."""
    return parse_location(f"s3://{BUCKET}/{uuid.uuid4().hex}")


def test_round_trips(storage: Storage, prefix: Location) -> None:
    storage.write_bytes(prefix / "a.bin", b"\x00\x01")
    storage.write_text(prefix / "dir/b.txt", "héllo")
    storage.write_json(prefix / "dir/c.json", {"n": 1})

    assert storage.read_bytes(prefix / "a.bin") == b"\x00\x01"
    assert storage.read_text(prefix / "dir/b.txt") == "héllo"
    assert storage.read_json(prefix / "dir/c.json") == {"n": 1}
    assert storage.exists(prefix / "a.bin") and not storage.exists(prefix / "nope")
    assert [loc.relative_to(prefix) for loc in storage.list_prefix(prefix)] == [
        "a.bin",
        "dir/b.txt",
        "dir/c.json",
    ]
    storage.delete(prefix / "a.bin")
    assert not storage.exists(prefix / "a.bin")


def test_endpoint_comes_from_the_standard_variable(
    s3_endpoint: str, prefix: Location, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)

    storage = Storage(pvc_mounts={})
    storage.write_text(prefix / "x.txt", "via env")

    assert storage.s3_endpoint_url == s3_endpoint
    assert storage.read_text(prefix / "x.txt") == "via env"


def test_tree_upload_download_and_digest_equality(
    storage: Storage, prefix: Location, tmp_path: Path, make_tree
) -> None:
    files = make_tree(tmp_path / "src")
    storage.write_text(prefix / "tree/stale.txt", "left from an earlier upload")

    storage.upload_tree(tmp_path / "src", prefix / "tree")
    local = storage.download_tree(prefix / "tree", tmp_path / "dst")

    assert [
        loc.relative_to(prefix / "tree") for loc in storage.list_prefix(prefix / "tree")
    ] == sorted(files, key=str.encode)
    assert {
        p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()
    } == files
    digest = storage.tree_digest(tmp_path / "src")
    assert storage.tree_digest(prefix / "tree") == digest == storage.tree_digest(local)
    assert (
        storage.digest(prefix / "tree/weights/model.bin")
        == hashlib.sha256(files["weights/model.bin"]).hexdigest()
    )


def test_copies_between_stores(
    storage: Storage, prefix: Location, tmp_path: Path, make_tree
) -> None:
    make_tree(tmp_path / "src")
    storage.upload_tree(tmp_path / "src", prefix / "a")

    storage.copy_tree(prefix / "a", prefix / "b")
    storage.copy_file(prefix / "b/weights/model.bin", tmp_path / "model.bin")
    storage.copy_file(tmp_path / "model.bin", prefix / "c/model.bin")
    storage.copy_file(prefix / "c/model.bin", prefix / "d/model.bin")

    assert storage.tree_digest(prefix / "b") == storage.tree_digest(tmp_path / "src")
    assert storage.digest(prefix / "d/model.bin") == storage.digest(
        tmp_path / "src/weights/model.bin"
    )


@pytest.mark.parametrize("bad_key", ["tree/../../escape", "tree//x"])
def test_download_refuses_keys_that_leave_the_tree(
    storage: Storage, s3_endpoint: str, prefix: Location, tmp_path: Path, bad_key: str, one_line
) -> None:
    # Given an object written by another tool with a key that climbs out of the tree
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(
        Bucket=BUCKET, Key=f"{prefix.key}/{bad_key}", Body=b"x"
    )
    storage.write_text(prefix / "tree/ok.txt", "ok")

    with pytest.raises(StorageError) as error:
        storage.download_tree(prefix / "tree", tmp_path / "dst")

    assert one_line(error).startswith(f"{prefix}/tree: sub-path")
    assert not (tmp_path / "dst").exists() and not (tmp_path / "escape").exists()


def test_missing_object_and_bucket_are_one_line(
    storage: Storage, prefix: Location, one_line
) -> None:
    with pytest.raises(StorageError) as missing:
        storage.read_bytes(prefix / "absent.json")
    with pytest.raises(StorageError) as no_bucket:
        storage.read_bytes("s3://no-such-bucket-here/x.json")

    assert one_line(missing) == f"{prefix}/absent.json: no such object"
    assert one_line(no_bucket) == "s3://no-such-bucket-here/x.json: the bucket does not exist"


def test_unreachable_store_is_one_line_after_bounded_retries(
    aws_env: None, unreachable_endpoint: str, one_line
) -> None:
    storage = Storage(s3_endpoint_url=unreachable_endpoint, pvc_mounts={}, retry=FAST_RETRY)

    started = time.monotonic()
    with pytest.raises(StorageError) as error:
        storage.read_bytes(f"s3://{BUCKET}/x.json")

    message = one_line(error)
    assert message.startswith(
        f"s3://{BUCKET}/x.json: store unreachable or unavailable after 3 tries"
    )
    assert time.monotonic() - started < 5


def test_denied_access_is_one_line(aws_env: None, start_moto_server, one_line) -> None:
    # A second server that checks credentials: the test key pair is unknown to it.
    with start_moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as url:
        storage = Storage(s3_endpoint_url=url, pvc_mounts={}, retry=FAST_RETRY)
        with pytest.raises(StorageError) as error:
            storage.read_bytes(f"s3://{BUCKET}/x.json")

    assert one_line(error).startswith(f"s3://{BUCKET}/x.json: access denied")


class _ResettingProxy:
    """A TCP proxy to ``target`` that resets its first ``drops`` connections."""

    def __init__(self, target: str, drops: int) -> None:
        self.target = ("127.0.0.1", int(target.rsplit(":", 1)[1]))
        self.drops, self.dropped = drops, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.dropped < self.drops:
                self.dropped += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()  # linger 0: the peer sees a reset
                continue
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


def test_connection_resets_are_retried(s3_endpoint: str, prefix: Location) -> None:
    proxy = _ResettingProxy(s3_endpoint, drops=2)
    try:
        storage = Storage(s3_endpoint_url=proxy.url, pvc_mounts={}, retry=FAST_RETRY)
        storage.write_text(prefix / "through-resets.txt", "made it")
    finally:
        proxy.close()

    assert proxy.dropped == 2
    assert (
        Storage(s3_endpoint_url=s3_endpoint, pvc_mounts={}).read_text(prefix / "through-resets.txt")
        == "made it"
    )


def test_create_only_twice_second_is_refused(storage: Storage, prefix: Location, one_line) -> None:
    ptr = prefix / "pointer.json"
    assert storage.read_versioned(ptr) is None

    version = storage.create(ptr, b'{"v": 1}')
    with pytest.raises(PreconditionFailed) as error:
        storage.create(ptr, b'{"v": 2}')

    assert one_line(error) == f"{ptr}: precondition failed: the object already exists"
    current = storage.read_versioned(ptr)
    assert current is not None and (current.data, current.version) == (b'{"v": 1}', version)


def test_compare_and_swap_with_a_stale_etag_is_refused(
    storage: Storage, prefix: Location, one_line
) -> None:
    ptr = prefix / "pointer.json"
    first = storage.create(ptr, b"1")
    second = storage.compare_and_swap(ptr, b"2", first)

    with pytest.raises(PreconditionFailed) as error:
        storage.compare_and_swap(ptr, b"3", first)

    assert second != first
    assert "precondition failed" in one_line(error)
    assert storage.read_bytes(ptr) == b"2"


def test_eight_threads_of_cas_increments_lose_no_update(
    storage: Storage, prefix: Location, contended_increment
) -> None:
    # Given eight writers that all read the counter before any of them writes
    ptr = prefix / "counter.json"
    increment, calls = contended_increment(8)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            storage.update_json(ptr, increment)
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    # When each adds one through read-modify-write with compare-and-swap
    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # Then seven lost a race at least once, retried, and no increment was lost
    assert errors == []
    assert len(calls) >= 8 + 7
    assert storage.read_json(ptr) == {"count": 8}
