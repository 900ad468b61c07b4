"""Every malformed input: one line ``FILE:LINE: rule: detail``, exit code 2, nothing written.

Each case runs ``lorafleet data validate FILE --task TASK --out OUT`` through the real CLI
entry point (in process, so great-expectations is imported once) and checks the exact
rule and line reported and that ``OUT`` was not created.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafleet.cli import main

ANALYSIS = {
    "skills": ["React"],
    "deliverables": ["A sales dashboard"],
    "budget": {"type": "fixed", "min": 500, "max": 500, "currency": "USD"},
    "timeline": "2 weeks",
    "open_questions": [],
}
SYSTEM = {"role": "system", "content": "Analyze the post."}
ASSISTANT = {"role": "assistant", "content": json.dumps(ANALYSIS)}


def user(i: int) -> dict:
    return {"role": "user", "content": f"Need a React dashboard for our sales team, job {i}."}


def rec(i: int, **over) -> dict:
    return {
        "id": f"r{i}",
        "task": "job-analyzer",
        "messages": [SYSTEM, user(i), ASSISTANT],
        "source": "human",
        "meta": {},
        **over,
    }


def lines(bad: str | bytes) -> bytes:
    """A file whose line 2 is ``bad`` between two good records."""
    bad = bad.encode() if isinstance(bad, str) else bad
    return json.dumps(rec(1)).encode() + b"\n" + bad + b"\n" + json.dumps(rec(3)).encode() + b"\n"


def bad_rec(**over) -> bytes:
    return lines(json.dumps(rec(2, **over)))


def drop(key: str) -> bytes:
    return lines(json.dumps({k: v for k, v in rec(2).items() if k != key}))


CANDIDATES = "Job: build a landing page.\n\nCandidate A (rate $30/hr):\nI can do it.\n\nCandidate B (rate $40/hr):\nI did ten."


def ranking(*letters: str) -> str:
    items = [
        {"candidate": c, "rank": i, "score": 5.0, "strengths": [], "concerns": []}
        for i, c in enumerate(letters, 1)
    ]
    return json.dumps({"ranking": items, "recommendation": "Hire A."})


def evaluator(i: int, answer: str) -> dict:
    msgs = [
        {"role": "user", "content": CANDIDATES + f" #{i}"},
        {"role": "assistant", "content": answer},
    ]
    return {
        "id": f"c{i}",
        "task": "candidate-evaluator",
        "messages": msgs,
        "source": "human",
        "meta": {},
    }


def evaluator_file(answer: str) -> bytes:
    return "".join(
        json.dumps(evaluator(i, a)) + "\n" for i, a in enumerate([ranking("A", "B"), answer], 1)
    ).encode()


U, A = user(2), {"role": "assistant", "content": "Sure."}
CASES = {
    # -- the reader: syntax and schema, line by line ---------------------------------------
    "broken-json": (lines('{"id": "r2", "task": '), 2, "json"),
    "trailing-garbage": (lines(json.dumps(rec(2)) + " x"), 2, "json"),
    "nan-constant": (
        lines(json.dumps(rec(2)).replace('"meta": {}', '"meta": {"score": NaN}')),
        2,
        "json",
    ),
    "duplicate-key": (
        lines(json.dumps(rec(2)).replace('"id": "r2"', '"id": "r2", "id": "r9"')),
        2,
        "duplicate-key",
    ),
    "utf8-bom": (b"\xef\xbb\xbf" + lines(json.dumps(rec(2))), 1, "utf8-bom"),
    "invalid-utf8": (lines(json.dumps(rec(2)).encode().replace(b"job 2", b"job \xff")), 2, "utf8"),
    "nul-byte": (lines(json.dumps(rec(2)).encode().replace(b"job 2", b"job\x002")), 2, "nul-byte"),
    "json-array-one-line": (json.dumps([rec(1), rec(2)]).encode() + b"\n", 1, "json-array"),
    "json-array-pretty": (json.dumps([rec(1), rec(2)], indent=2).encode(), 1, "json-array"),
    "empty-file": (b"", None, "empty-file"),
    "only-blank-lines": (b"\n  \n\r\n", None, "empty-file"),
    "a-string": (lines('"hello"'), 2, "not-an-object"),
    "a-number": (lines("42"), 2, "not-an-object"),
    "missing-id": (drop("id"), 2, "missing-field"),
    "missing-messages": (drop("messages"), 2, "missing-field"),
    "missing-source": (drop("source"), 2, "missing-field"),
    "extra-field": (bad_rec(label="x"), 2, "unknown-field"),
    "extra-field-in-message": (bad_rec(messages=[{**U, "name": "bob"}, A]), 2, "unknown-field"),
    "id-not-a-string": (bad_rec(id=2), 2, "wrong-type"),
    "messages-a-string": (bad_rec(messages="hello"), 2, "wrong-type"),
    "message-a-list": (bad_rec(messages=[["user", "hi"]]), 2, "wrong-type"),
    "content-a-number": (bad_rec(messages=[{"role": "user", "content": 5}, A]), 2, "wrong-type"),
    "content-null": (bad_rec(messages=[{"role": "user", "content": None}, A]), 2, "wrong-type"),
    "meta-a-list": (bad_rec(meta=[]), 2, "wrong-type"),
    "unknown-role": (bad_rec(messages=[{"role": "robot", "content": "hi"}, A]), 2, "unknown-role"),
    "unknown-source": (bad_rec(source="scraped"), 2, "unknown-source"),
    "other-task": (bad_rec(task="poet"), 2, "wrong-task"),
    "bad-task-name": (bad_rec(task="Poet Writer"), 2, "bad-task-name"),
    "empty-id": (bad_rec(id=""), 2, "empty-field"),
    "no-messages": (bad_rec(messages=[]), 2, "empty-field"),
    "line-too-long": (bad_rec(meta={"blob": "x" * (1 << 20)}), 2, "line-too-long"),
    # -- the great-expectations suite: rules across records --------------------------------
    "duplicate-id": (lines(json.dumps(rec(2, id="r3"))), 2, "duplicate-id"),
    "wrong-task": (bad_rec(task="proposal-writer"), 2, "wrong-task"),
    "system-not-first": (bad_rec(messages=[U, SYSTEM, ASSISTANT]), 2, "role-order"),
    "two-user-turns": (bad_rec(messages=[U, U, ASSISTANT]), 2, "role-order"),
    "two-assistant-turns": (bad_rec(messages=[U, ASSISTANT, ASSISTANT]), 2, "role-order"),
    "ends-on-user": (bad_rec(messages=[U, ASSISTANT, U]), 2, "role-order"),
    "starts-with-assistant": (bad_rec(messages=[ASSISTANT]), 2, "role-order"),
    "empty-content": (
        bad_rec(messages=[{"role": "user", "content": ""}, ASSISTANT]),
        2,
        "empty-content",
    ),
    "whitespace-content": (
        bad_rec(messages=[{"role": "user", "content": " \n\t"}, ASSISTANT]),
        2,
        "empty-content",
    ),
    "content-too-long": (
        bad_rec(messages=[{"role": "user", "content": "word " * 100}, ASSISTANT]),
        2,
        "content-too-long",
    ),
    "content-too-short": (
        bad_rec(messages=[{"role": "user", "content": "Hi"}, ASSISTANT]),
        2,
        "content-too-short",
    ),
    "answer-not-json": (
        bad_rec(messages=[U, {"role": "assistant", "content": "Skills: React"}]),
        2,
        "answer-not-json",
    ),
    "answer-missing-key": (
        bad_rec(
            messages=[
                U,
                {
                    "role": "assistant",
                    "content": json.dumps({k: v for k, v in ANALYSIS.items() if k != "budget"}),
                },
            ]
        ),
        2,
        "answer-schema",
    ),
    "email-under-reject": (
        bad_rec(
            messages=[{"role": "user", "content": "Write to ana@example.com please"}, ASSISTANT]
        ),
        2,
        "pii",
    ),
    "candidate-not-ranked": (evaluator_file(ranking("A")), 2, "reference-ranking_valid"),
    "candidate-ranked-twice": (
        evaluator_file(ranking("A", "A", "B")),
        2,
        "reference-ranking_valid",
    ),
}


def run_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str
) -> tuple[int, list[str]]:
    monkeypatch.setattr("sys.argv", ["lorafleet", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize(("content", "line", "rule"), list(CASES.values()), ids=list(CASES))
def test_malformed_input_is_one_line_exit_2_and_nothing_written(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    content: bytes,
    line: int | None,
    rule: str,
) -> None:
    # Given a file with one mistake
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    out = tmp_path / "clean.jsonl"
    task = "candidate-evaluator" if rule == "reference-ranking_valid" else "job-analyzer"
    # When it is validated with a clean copy requested
    code, err = run_cli(
        monkeypatch,
        capsys,
        "data",
        "validate",
        str(data),
        "--task",
        task,
        "--out",
        str(out),
        "--min-chars",
        "5",
        "--max-chars",
        "300",
        "--pii",
        "reject",
    )
    # Then: exit 2, the first line names file, line and rule, and no copy was written
    assert code == 2
    findings = [e.removeprefix("error: ") for e in err if not e.startswith("warning: ")]
    assert findings, err
    where = f"{data}:{line}" if line else str(data)
    assert findings[0].startswith(f"{where}: {rule}: "), findings
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]


def test_there_are_at_least_thirty_distinct_cases() -> None:
    assert len(CASES) >= 30
    assert len({(c, r) for c, _, r in CASES.values()}) == len(CASES)


def test_crlf_line_endings_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_bytes(lines(json.dumps(rec(2))).replace(b"\n", b"\r\n"))
    out = tmp_path / "clean.jsonl"
    code, err = run_cli(
        monkeypatch,
        capsys,
        "data",
        "validate",
        str(data),
        "--task",
        "job-analyzer",
        "--out",
        str(out),
    )
    assert code == 0, err
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["r1", "r2", "r3"]


def test_scrub_policy_warns_and_writes_placeholders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_bytes(
        bad_rec(
            messages=[
                {"role": "user", "content": "Call me at +44 20 7946 0958 about the React job"},
                ASSISTANT,
            ]
        )
    )
    out = tmp_path / "clean.jsonl"
    code, err = run_cli(
        monkeypatch,
        capsys,
        "data",
        "validate",
        str(data),
        "--task",
        "job-analyzer",
        "--out",
        str(out),
        "--pii",
        "scrub",
    )
    assert code == 0
    assert f"warning: {data}:2: pii: personal data or an off-platform request (got 'phone')" in err
    scrubbed = json.loads(out.read_text().splitlines()[1])["messages"][0]["content"]
    assert scrubbed == "Call me at [PHONE] about the React job"
