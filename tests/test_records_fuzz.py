"""Property tests: whatever bytes a data file holds, reading it gives records or one
:class:`DataError` line naming the file, the line and the rule — never another exception."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafleet.errors import DataError
from lorafleet.records import read_records

# JSON-ish values, so that many examples get past the JSON parser into the record rules.
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "x"]), "content": _json}
)
_recordish = st.fixed_dictionaries(
    {},
    optional={
        "id": _json,
        "task": st.sampled_from(["chat", "job-analyzer", "nope"]) | _json,
        "messages": st.lists(_message, max_size=4) | _json,
        "source": st.sampled_from(["human", "synthetic", "other"]),
        "meta": _json,
        "extra": _json,
    },
)
_line = (
    st.binary(max_size=200)
    | st.text(max_size=200).map(str.encode)
    | _json.map(lambda v: json.dumps(v).encode())
    | _recordish.map(lambda v: json.dumps(v).encode())
)


def _check(path: Path) -> None:
    try:
        records = read_records(path, max_line_bytes=4096)
    except DataError as exc:
        message = str(exc)
        assert "\n" not in message and "Traceback" not in message
        assert message.startswith(str(path)) and exc.rule
    else:
        assert all(isinstance(n, int) and n >= 1 for n, _ in records)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lines=st.lists(_line, max_size=5))
def test_any_file_reads_or_fails_in_one_line(tmp_path: Path, lines: list[bytes]) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines))
    _check(path)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payload=st.binary(max_size=300)
    | st.lists(_line, max_size=4).map(lambda lines: gzip.compress(b"\n".join(lines)))
)
def test_any_gzip_named_file_reads_or_fails_in_one_line(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(payload)
    _check(path)


def test_the_strategies_reach_valid_records(tmp_path: Path) -> None:
    # The properties above mean something only if valid records are among the examples'
    # neighbours: a well-formed line of the same shape parses.
    line = {
        "id": "r1",
        "task": "chat",
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "source": "human",
    }
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps(line) + "\n")
    assert [r.id for _, r in read_records(path)] == ["r1"]
