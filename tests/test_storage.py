"""The storage layer on local paths and pvc:// claims, and its URI parser (unit tier)."""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import stat
import threading
from pathlib import Path

import botocore.exceptions
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafleet.errors import LorafleetError, StorageError
from lorafleet.storage import (
    DEFAULT_PVC_ROOT,
    PVC_MOUNTS_ENV,
    PVC_ROOT_ENV,
    Location,
    PreconditionFailed,
    RetryPolicy,
    Storage,
    is_transient,
    parse_location,
    parse_pvc_mounts,
)


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    """A storage with one claim, ``models``, mounted at ``tmp_path/mnt/models`` (and an
    empty claims root, so no other claim is found)."""
    mount = tmp_path / "mnt" / "models"
    mount.mkdir(parents=True)
    return Storage(pvc_mounts={"models": mount}, pvc_root=tmp_path / "pvc")


# --- parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "scheme", "root", "key"),
    [
        ("s3://bucket-1/runs/a.json", "s3", "bucket-1", "runs/a.json"),
        ("s3://bucket-1/runs/", "s3", "bucket-1", "runs"),
        ("S3://bucket-1", "s3", "bucket-1", ""),
        ("gs://my_bucket/x/y", "gs", "my_bucket", "x/y"),
        ("pvc://models/adapters/v1", "pvc", "models", "adapters/v1"),
        ("pvc://models", "pvc", "models", ""),
        ("file:///data/x", "file", "", "data/x"),
        ("file://localhost/data/x", "file", "", "data/x"),
        ("/data/../data/./x", "file", "", "data/x"),
    ],
)
def test_parse_location_forms(text: str, scheme: str, root: str, key: str) -> None:
    loc = parse_location(text)

    assert (loc.scheme, loc.root, loc.key) == (scheme, root, key)
    assert parse_location(loc.uri) == loc


def test_relative_local_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    loc = parse_location("../sibling/file.txt")

    assert loc.uri == str(tmp_path.parent / "sibling" / "file.txt")
    assert parse_location(tmp_path / "x") == Location("file", "", str(tmp_path / "x").lstrip("/"))


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("pvc://x//etc", "empty segment"),
        ("pvc://..//etc", "invalid claim '..'"),
        ("pvc://../etc", "invalid claim '..'"),
        ("s3://bucket-1/../etc", "'..' segments are not allowed"),
        ("s3://bucket-1/a/../../etc", "'..' segments are not allowed"),
        ("gs://bucket-1/a/./b", "'.' segments are not allowed"),
        ("gs://bucket-1/a//b", "empty path segment"),
        ("s3://Bucket/k", "invalid bucket 'Bucket'"),
        ("s3://a..b/k", "invalid bucket 'a..b'"),
        ("file://otherhost/etc", "absolute path"),
        ("file://", "absolute path"),
        ("file:///a/../etc", "'..' segments are not allowed"),
        ("ftp://host/x", "unknown scheme 'ftp'"),
        ("s3:/bucket-1/k", "malformed URI"),
        ("", "empty location"),
        ("s3://bucket-1/a\nb", "control characters"),
        ("/tmp/\ud800", "UTF-8"),
    ],
)
def test_parse_location_refusals_are_one_line(text: str, rule: str, one_line) -> None:
    with pytest.raises(StorageError) as error:
        parse_location(text)

    message = one_line(error)
    assert rule in message
    assert message.startswith((text if text.isprintable() else ascii(text)) + ":") or not text


@pytest.mark.parametrize("part", ["../x", "a/../../x", "/etc", "a//b", "a/", "", ".", "x\x00y"])
def test_join_refuses_parts_that_leave_the_location(part: str, one_line) -> None:
    base = parse_location("s3://bucket-1/runs")

    with pytest.raises(StorageError) as error:
        base / part

    assert one_line(error).startswith("s3://bucket-1/runs: sub-path")


def test_join_and_navigation() -> None:
    base = parse_location("pvc://models/adapters")

    child = base / "writer/v1" / "adapter_config.json"

    assert child.uri == "pvc://models/adapters/writer/v1/adapter_config.json"
    assert child.name == "adapter_config.json"
    assert child.parent.uri == "pvc://models/adapters/writer/v1"
    assert child.relative_to(base) == "writer/v1/adapter_config.json"
    with pytest.raises(StorageError):
        base.relative_to(child)


def test_constructing_a_location_checks_the_rules() -> None:
    with pytest.raises(StorageError, match=r"'\.\.' segments"):
        Location("s3", "bucket-1", "a/../b")
    with pytest.raises(StorageError, match="unknown scheme"):
        Location("http", "x", "y")  # type: ignore[arg-type]


def _inside(child: Location, base: Location) -> bool:
    prefix = f"{base.key}/" if base.key else ""
    return (
        (child.scheme, child.root) == (base.scheme, base.root)
        and child.key.startswith(prefix)
        and len(child.key) > len(prefix)
    )


URI_TEXT = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda scheme, rest: scheme + rest,
        st.sampled_from(["s3://", "gs://", "pvc://", "file://", "S3://", "pvc://..", "file:///"]),
        st.text(alphabet=st.sampled_from(list("ab./-_\\:%\x00\n é")), max_size=30),
    ),
)
PART_TEXT = st.one_of(
    st.text(max_size=20),
    st.text(alphabet=st.sampled_from(list("a./\\")), max_size=12),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=URI_TEXT, parts=st.lists(PART_TEXT, max_size=3))
def test_parser_property_contained_or_one_line_error(text: str, parts: list[str]) -> None:
    """For any text: a location whose joins stay inside it, or a one-line StorageError."""
    try:
        loc = parse_location(text)
    except StorageError as error:
        assert "\n" not in str(error)
        return
    assert parse_location(loc.uri) == loc
    for part in parts:
        try:
            child = loc / part
        except StorageError as error:
            assert "\n" not in str(error)
            continue
        assert _inside(child, loc)
        if loc.scheme == "pvc":
            mount = Path("/mnt/claim")
            resolved = Storage(pvc_mounts={loc.root: mount}).local_path(child)
            assert resolved is not None
            assert os.path.commonpath([os.path.normpath(resolved), mount]) == str(mount)


# --- pvc mounts ------------------------------------------------------------------------


def test_pvc_mounts_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PVC_MOUNTS_ENV, f"models={tmp_path}/a, data={tmp_path}/b")

    storage = Storage()

    assert storage.local_path("pvc://data/x/y") == tmp_path / "b" / "x" / "y"
    assert storage.local_path("s3://bucket-1/x") is None


def test_unmounted_claim_is_one_line_naming_claim_and_mounts(
    storage: Storage, tmp_path: Path, one_line
) -> None:
    with pytest.raises(StorageError) as error:
        storage.read_bytes("pvc://datasets/seed.jsonl")

    message = one_line(error)
    assert message.startswith("pvc://datasets/seed.jsonl: claim 'datasets' is not mounted")
    assert f"models={tmp_path / 'mnt' / 'models'}" in message
    assert PVC_MOUNTS_ENV in message


@pytest.mark.parametrize("text", ["models", "models=relative/path", "../x=/mnt/a"])
def test_malformed_pvc_mounts_are_refused(text: str, one_line) -> None:
    with pytest.raises(StorageError) as error:
        parse_pvc_mounts(text)

    assert one_line(error).startswith(f"{PVC_MOUNTS_ENV}: entry")


def test_unlisted_claim_is_found_under_the_pvc_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_line
) -> None:
    # Given a claim listed in the mounts and two others mounted under the root, one of
    # them listed too (the list wins)
    (tmp_path / "pvc" / "adapters").mkdir(parents=True)
    (tmp_path / "pvc" / "models").mkdir(parents=True)
    monkeypatch.setenv(PVC_MOUNTS_ENV, f"models={tmp_path}/mnt/models")
    monkeypatch.setenv(PVC_ROOT_ENV, str(tmp_path / "pvc"))
    storage = Storage()

    # When an unlisted claim is written and read, it lands at ROOT/CLAIM
    storage.write_text("pvc://adapters/writer/v1/note.txt", "hi")

    assert (tmp_path / "pvc" / "adapters" / "writer" / "v1" / "note.txt").read_text() == "hi"
    assert storage.read_text("pvc://adapters/writer/v1/note.txt") == "hi"
    assert storage.local_path("pvc://models/x") == tmp_path / "mnt" / "models" / "x"
    # and a claim that is neither listed nor under the root is still not mounted
    with pytest.raises(StorageError) as error:
        storage.local_path("pvc://datasets/x")
    message = one_line(error)
    assert "claim 'datasets' is not mounted" in message
    assert f"mount it at {tmp_path / 'pvc' / 'datasets'}" in message


def test_pvc_root_defaults_to_mnt_pvc_and_must_be_absolute(
    monkeypatch: pytest.MonkeyPatch,
    one_line,
) -> None:
    monkeypatch.delenv(PVC_ROOT_ENV, raising=False)
    assert Storage().pvc_root == DEFAULT_PVC_ROOT == Path("/mnt/pvc")

    monkeypatch.setenv(PVC_ROOT_ENV, "relative/claims")
    with pytest.raises(StorageError) as error:
        Storage()
    assert one_line(error) == f"{PVC_ROOT_ENV}: 'relative/claims' must be an absolute path"


# --- local and pvc operations ----------------------------------------------------------


@pytest.mark.parametrize("prefix", ["local", "pvc://models"])
def test_round_trips(storage: Storage, tmp_path: Path, prefix: str) -> None:
    base = parse_location(tmp_path / "store") if prefix == "local" else parse_location(prefix)

    storage.write_bytes(base / "a.bin", b"\x00\x01")
    storage.write_text(base / "dir/b.txt", "héllo")
    storage.write_json(base / "dir/c.json", {"n": 1, "name": "é"})

    assert storage.read_bytes(base / "a.bin") == b"\x00\x01"
    assert storage.read_text(base / "dir/b.txt") == "héllo"
    assert storage.read_json(base / "dir/c.json") == {"n": 1, "name": "é"}
    assert storage.exists(base / "dir") and not storage.exists(base / "nope")
    assert [loc.relative_to(base) for loc in storage.list_prefix(base)] == [
        "a.bin",
        "dir/b.txt",
        "dir/c.json",
    ]
    storage.delete(base / "a.bin")
    assert not storage.exists(base / "a.bin")


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_atomic_writes_honour_the_umask_and_leave_no_temp_files(tmp_path: Path, umask: int) -> None:
    storage = Storage(pvc_mounts={})
    old = os.umask(umask)
    try:
        storage.write_text(tmp_path / "out" / "x.txt", "one")
        storage.write_text(tmp_path / "out" / "x.txt", "two")
        storage.create(tmp_path / "out" / "ptr.json", b"{}")
    finally:
        os.umask(old)

    assert (tmp_path / "out" / "x.txt").read_text() == "two"
    for name in ("x.txt", "ptr.json"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".lorafleet-tmp")]
    assert [loc.name for loc in storage.list_prefix(tmp_path / "out")] == ["ptr.json", "x.txt"]


def test_missing_object_and_bad_json_are_one_line(
    storage: Storage, tmp_path: Path, one_line
) -> None:
    (tmp_path / "bad.json").write_text("{nope")

    with pytest.raises(StorageError) as missing:
        storage.read_bytes("pvc://models/absent.bin")
    with pytest.raises(StorageError) as bad:
        storage.read_json(tmp_path / "bad.json")
    with pytest.raises(StorageError) as root:
        storage.read_bytes("pvc://models")

    assert one_line(missing) == "pvc://models/absent.bin: no such object"
    assert one_line(bad).startswith(f"{tmp_path / 'bad.json'}: not valid JSON (line 1, column 2)")
    assert "not an object" in one_line(root)
    assert isinstance(missing.value, LorafleetError)


def _expected_tree_digest(files: dict[str, bytes]) -> str:
    """The documented form: ``sha256  path`` lines sorted by path bytes, then hashed."""
    lines = sorted(
        (rel.encode(), f"{hashlib.sha256(data).hexdigest()}  {rel}\n")
        for rel, data in files.items()
    )
    return hashlib.sha256("".join(line for _, line in lines).encode()).hexdigest()


def test_tree_upload_download_and_digest_on_a_claim(
    storage: Storage, tmp_path: Path, make_tree
) -> None:
    files = make_tree(tmp_path / "src")
    (storage.local_path("pvc://models/adapters/w") / "stale.txt").parent.mkdir(parents=True)
    (storage.local_path("pvc://models/adapters/w") / "stale.txt").write_text("old")

    uploaded = storage.upload_tree(tmp_path / "src", "pvc://models/adapters/w")
    local = storage.download_tree("pvc://models/adapters/w", tmp_path / "dst")

    assert sorted(
        loc.relative_to(parse_location("pvc://models/adapters/w")) for loc in uploaded
    ) == sorted(files)
    assert {
        p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()
    } == files
    assert storage.tree_digest("pvc://models/adapters/w") == _expected_tree_digest(files)
    assert storage.tree_digest(local) == storage.tree_digest(tmp_path / "src")
    assert (
        storage.digest("pvc://models/adapters/w/weights/model.bin")
        == hashlib.sha256(files["weights/model.bin"]).hexdigest()
    )


def test_a_failed_download_leaves_the_destination_untouched(
    storage: Storage, tmp_path: Path, one_line, make_tree
) -> None:
    # Given a tree whose last file cannot be copied (a FIFO), and a destination in place
    make_tree(tmp_path / "src")
    os.mkfifo(tmp_path / "src" / "zz-fifo")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("keep")

    # When it is downloaded over the destination
    with pytest.raises(StorageError) as error:
        storage.download_tree(tmp_path / "src", tmp_path / "dst")

    # Then the destination is as it was and nothing half-written is left beside it
    assert one_line(error).startswith(f"{tmp_path / 'src' / 'zz-fifo'}:")
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "mnt", "src"]


def test_empty_prefix_is_refused_for_tree_operations(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no objects under this prefix"):
        storage.download_tree("pvc://models/none", tmp_path / "dst")
    with pytest.raises(StorageError, match="not a directory with files"):
        storage.upload_tree(tmp_path / "missing", "pvc://models/x")


def test_copy_between_local_and_claim(storage: Storage, tmp_path: Path, make_tree) -> None:
    make_tree(tmp_path / "src")

    storage.copy_tree(tmp_path / "src", "pvc://models/copy")
    storage.copy_file("pvc://models/copy/weights/model.bin", tmp_path / "one.bin")

    assert storage.tree_digest("pvc://models/copy") == storage.tree_digest(tmp_path / "src")
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "src/weights/model.bin").read_bytes()


# --- conditional writes ----------------------------------------------------------------


def test_create_only_and_compare_and_swap_locally(storage: Storage, one_line) -> None:
    ptr = "pvc://models/pointers/writer.json"
    assert storage.read_versioned(ptr) is None

    first = storage.create(ptr, b"1")
    with pytest.raises(PreconditionFailed) as again:
        storage.create(ptr, b"2")
    second = storage.compare_and_swap(ptr, b"2", first)
    with pytest.raises(PreconditionFailed) as stale:
        storage.compare_and_swap(ptr, b"3", first)

    assert one_line(again) == f"{ptr}: precondition failed: the object already exists"
    assert "precondition failed" in one_line(stale)
    current = storage.read_versioned(ptr)
    assert current is not None and (current.data, current.version) == (b"2", second)
    with pytest.raises(PreconditionFailed):
        storage.compare_and_swap("pvc://models/pointers/absent.json", b"x", first)


def test_eight_threads_lose_no_update_locally(storage: Storage, contended_increment) -> None:
    ptr = "pvc://models/pointers/counter.json"
    increment, calls = contended_increment(8)
    threads = [
        threading.Thread(target=storage.update_json, args=(ptr, increment)) for _ in range(8)
    ]

    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(calls) >= 8 + 7  # seven writers lost the first race and retried
    assert storage.read_json(ptr) == {"count": 8}


def _increment_in_process(mount: str, times: int) -> None:
    storage = Storage(pvc_mounts={"models": mount})
    for _ in range(times):
        storage.update_json(
            "pvc://models/pointers/counter.json",
            lambda value: {"count": (value or {"count": 0})["count"] + 1},
        )


def test_four_processes_lose_no_update_locally(storage: Storage) -> None:
    mount = str(storage.pvc_mounts["models"])
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_increment_in_process, args=(mount, 2)) for _ in range(4)]

    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)

    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert storage.read_json("pvc://models/pointers/counter.json") == {"count": 8}


# --- retries ---------------------------------------------------------------------------


def _client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    response = {
        "Error": {"Code": code, "Message": code},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return botocore.exceptions.ClientError(response, "PutObject")  # type: ignore[arg-type]


def _translated(cause: BaseException) -> OSError:
    """An error as s3fs raises it: an OSError raised from botocore's."""
    error = OSError(errno.EBUSY, "busy")
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (_client_error("SlowDown", 503), True),
        (_client_error("InternalError", 500), True),
        (_client_error("ThrottlingException", 400), True),
        (_translated(_client_error("ServiceUnavailable", 503)), True),
        (botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"), True),
        (botocore.exceptions.ConnectionClosedError(endpoint_url="http://x"), True),
        (ConnectionResetError(), True),
        (_client_error("NoSuchKey", 404), False),
        (_client_error("AccessDenied", 403), False),
        (_client_error("PreconditionFailed", 412), False),
        (FileNotFoundError(), False),
    ],
)
def test_transient_errors(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def test_retry_policy_is_capped_and_bounded() -> None:
    policy = RetryPolicy(attempts=6, base_delay=0.5, max_delay=2.0)

    delays = list(policy.delays())

    assert len(delays) == 5
    for delay, step in zip(delays, [0.5, 1.0, 2.0, 2.0, 2.0], strict=True):
        assert step / 2 <= delay <= step
    assert sum(RetryPolicy().delays()) <= 0.25 + 0.5 + 1.0


def test_json_writes_refuse_what_json_cannot_hold(storage: Storage, one_line) -> None:
    with pytest.raises(StorageError) as error:
        storage.write_json("pvc://models/x.json", {"loss": float("nan")})

    assert one_line(error).startswith("pvc://models/x.json: cannot be written as JSON")
