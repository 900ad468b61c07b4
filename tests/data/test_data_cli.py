"""``lorafleet data``: the commands end to end on the shipped data, in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafleet.cli import main
from lorafleet.llm import PLACEHOLDER_KEY

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DATA = EXAMPLES / "data" / "job-analyzer"


def run_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str
) -> tuple[int, str]:
    monkeypatch.setattr("sys.argv", ["lorafleet", "data", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


def test_validate_synthesize_shards_curate_and_stats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    spec = ("--spec", EXAMPLES / "fleet.yaml", "--expert", "job-analyzer")
    # validate: a clean copy and the three report files
    code, err = run_cli(
        monkeypatch,
        capsys,
        "validate",
        DATA / "seed.jsonl",
        *spec,
        "--out",
        tmp_path / "seeds.jsonl",
        "--report",
        tmp_path / "report",
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "validation.html",
        "validation.json",
        "validation.md",
    ]
    assert json.loads((tmp_path / "report" / "validation.json").read_text())["success"] is True
    # synthesize two shards of the seeds (as ParallelFor tasks would), and all at once
    outs = []
    for i in (1, 2):
        outs.append(tmp_path / f"syn-{i}.jsonl")
        code, err = run_cli(
            monkeypatch,
            capsys,
            "synthesize",
            tmp_path / "seeds.jsonl",
            "--out",
            outs[-1],
            "--shard",
            f"{i}/2",
            *spec,
        )
        assert code == 0, err
    code, err = run_cli(
        monkeypatch,
        capsys,
        "synthesize",
        tmp_path / "seeds.jsonl",
        "--out",
        tmp_path / "syn.jsonl",
        *spec,
    )
    assert code == 0, err
    whole = (tmp_path / "syn.jsonl").read_text().splitlines()
    assert sorted(whole) == sorted(line for p in outs for line in p.read_text().splitlines())
    # curate the shards together, with the stats artifact
    code, err = run_cli(
        monkeypatch,
        capsys,
        "curate",
        "--seeds",
        tmp_path / "seeds.jsonl",
        "--synthetic",
        outs[0],
        "--synthetic",
        outs[1],
        "--eval",
        DATA / "eval.jsonl",
        "--out",
        tmp_path / "train.jsonl",
        "--stats",
        tmp_path / "stats.json",
        *spec,
    )
    assert code == 0, err
    stats = json.loads((tmp_path / "stats.json").read_text())
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert stats["output"]["total"] == len(train) and stats["input"]["synthetic"] == sum(
        len(p.read_text().splitlines()) for p in outs
    )
    assert all(r["meta"]["provenance"]["seed_ids"] for r in train)
    assert "| near-dedup |" in (tmp_path / "stats.md").read_text()
    # stats over the result
    code, err = run_cli(
        monkeypatch, capsys, "stats", tmp_path / "train.jsonl", "--json", tmp_path / "numbers.json"
    )
    assert code == 0
    numbers = json.loads((tmp_path / "numbers.json").read_text())[str(tmp_path / "train.jsonl")]
    assert numbers["records"] == len(train) and set(numbers["source"]) == {"human", "synthetic"}


def test_stats_results_go_to_stdout_and_json_dash_means_stdout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lorafleet", "data", "stats", str(DATA / "seed.jsonl")])
    with pytest.raises(SystemExit) as exc:
        main()
    table = capsys.readouterr()
    assert exc.value.code == 0 and "records" in table.out and "records" not in table.err
    # the table is not cut when piped: the whole path is on one line
    assert str(DATA / "seed.jsonl") in table.out
    monkeypatch.setattr(
        "sys.argv", ["lorafleet", "data", "stats", str(DATA / "seed.jsonl"), "--json", "-"]
    )
    with pytest.raises(SystemExit) as exc:
        main()
    printed = capsys.readouterr().out
    assert exc.value.code == 0 and not (tmp_path / "-").exists()
    assert json.loads(printed)[str(DATA / "seed.jsonl")]["records"] == 30


def test_curate_writes_nothing_when_an_input_is_malformed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    broken = tmp_path / "syn.jsonl"
    broken.write_text('{"id": "s1"}\n')
    code, err = run_cli(
        monkeypatch,
        capsys,
        "curate",
        "--seeds",
        DATA / "seed.jsonl",
        "--synthetic",
        broken,
        "--eval",
        DATA / "eval.jsonl",
        "--out",
        tmp_path / "train.jsonl",
        "--stats",
        tmp_path / "stats.json",
    )
    assert code == 2
    assert err.strip() == f"error: {broken}:1: missing-field: task: Field required"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn.jsonl"]


def test_bad_options_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    code, err = run_cli(
        monkeypatch,
        capsys,
        "synthesize",
        DATA / "seed.jsonl",
        "--out",
        tmp_path / "s.jsonl",
        "--generator",
        "teacher",
    )
    assert code == 2
    assert err.strip() == (
        "error: --generator teacher needs a teacher: add --teacher-url URL and --teacher-model NAME"
    )
    code, err = run_cli(
        monkeypatch,
        capsys,
        "validate",
        DATA / "seed.jsonl",
        "--task",
        "job-analyzer",
        "--pii",
        "maybe",
    )
    assert code == 2 and err.startswith("error: invalid option: --pii: ")
    code, err = run_cli(
        monkeypatch,
        capsys,
        "synthesize",
        DATA / "seed.jsonl",
        "--out",
        tmp_path / "s.jsonl",
        "--shard",
        "3/2",
    )
    assert (
        code == 2 and err.strip() == "error: --shard '3/2': expected I/N with 1 <= I <= N, e.g. 2/8"
    )
    assert not list(tmp_path.iterdir())


def test_a_missing_teacher_key_stops_the_run_before_any_request(
    openai_stub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("LF_TEST_TEACHER_KEY", raising=False)
    code, err = run_cli(
        monkeypatch,
        capsys,
        "synthesize",
        DATA / "seed.jsonl",
        "--out",
        tmp_path / "s.jsonl",
        "--generator",
        "teacher",
        "--teacher-url",
        openai_stub.url,
        "--teacher-model",
        "teacher-m",
        "--api-key-env",
        "LF_TEST_TEACHER_KEY",
    )
    assert code == 2
    assert err.strip() == (
        "error: --api-key-env: environment variable LF_TEST_TEACHER_KEY is not "
        "set or empty (set it, or pass --api-key-env '' for a server that needs no key)"
    )
    assert openai_stub.requests == [] and not (tmp_path / "s.jsonl").exists()
    # '' names no key source (a local server): the run goes ahead with a placeholder key.
    code, err = run_cli(
        monkeypatch,
        capsys,
        "synthesize",
        DATA / "seed.jsonl",
        "--out",
        tmp_path / "s.jsonl",
        "--generator",
        "teacher",
        "--teacher-url",
        openai_stub.url,
        "--teacher-model",
        "teacher-m",
        "--api-key-env",
        "",
    )
    assert code == 0, err
    assert openai_stub.requests and {r["authorization"] for r in openai_stub.requests} == {
        f"Bearer {PLACEHOLDER_KEY}"
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # synthesize: the teacher's flags, not the spec's teacher block
        (["--teacher-url", "http://127.0.0.1:9/v1"], "invalid option: --teacher-model is required with --teacher-url"),
        (["--generator", "teacher", "--teacher-model", "m"], "invalid option: --teacher-url is required with --teacher-model"),
        (["--judge-model", "j"], "--judge-model needs a teacher: add --teacher-url URL and --teacher-model NAME"),
        (["--per-seed", "-1"], "invalid option: --per-seed: Input should be greater than or equal to 0"),
        (["--teacher-url", "http://x/v1", "--teacher-model", "m", "--min-score", "9"], "invalid option: --min-score: Input should be less than or equal to 5"),
    ],
)  # fmt: skip
def test_synthesize_options_are_named_as_typed(
    args: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    out = ("--out", tmp_path / "s.jsonl")
    code, err = run_cli(monkeypatch, capsys, "synthesize", DATA / "seed.jsonl", *out, *args)
    assert (code, err.strip()) == (2, f"error: {message}")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("validate", ["--min-chars", "100", "--max-chars", "10"], "--min-chars 100 must not exceed --max-chars 10"),
        ("validate", ["--min-chars", "9000"], "--min-chars 9000 must not exceed --max-chars"),
        ("validate", ["--min-chars", "0"], "--min-chars: Input should be greater than or equal to 1"),
        ("curate", ["--near-dup-threshold", "2"], "--near-dup-threshold: Input should be less than or equal to 1"),
        ("curate", ["--pii", "maybe"], "--pii: Input should be 'scrub', 'reject' or 'off'"),
    ],
)  # fmt: skip
def test_validate_and_curate_options_are_named_as_typed(
    command: str,
    args: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    files = {
        "validate": [DATA / "seed.jsonl", "--task", "job-analyzer"],
        "curate": ["--seeds", DATA / "seed.jsonl", "--eval", DATA / "eval.jsonl", "--out", tmp_path / "c.jsonl"],
    }  # fmt: skip
    code, err = run_cli(monkeypatch, capsys, command, *files[command], *args)
    assert (code, err.strip()) == (2, f"error: invalid option: {message}")
    assert not list(tmp_path.iterdir())
