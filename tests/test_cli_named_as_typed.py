"""A new user's mistakes with the data and eval commands, through the real CLI: each is one
line naming the flag the user typed (or the spec field, when the spec gave the value), exit
code 2, and nothing written."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DATA = EXAMPLES / "data" / "job-analyzer"


@pytest.fixture
def dead_url() -> str:
    """An OpenAI-style API root on a local port nothing listens on (connections refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    return {**env, "COLUMNS": "400", **extra}


def _one_error(proc) -> str:
    """The single ``error:`` line of a failed command (asserting there is only that)."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0].removeprefix("error: ")


def test_teacher_errors_name_the_flags_typed(
    lorafleet_cli: Callable, dead_url: str, tmp_path: Path
) -> None:
    synth = ("data", "synthesize", str(DATA / "seed.jsonl"), "--out", "s.jsonl")
    teacher = ("--generator", "teacher", "--teacher-url", dead_url, "--teacher-model", "m")
    # An unreachable teacher the user typed: named by its flag, in seconds
    proc = lorafleet_cli(*synth, *teacher, "--api-key-env", "", cwd=tmp_path, env=_env())
    assert _one_error(proc) == f"--teacher-url: {dead_url} is unreachable (Connection refused)"
    # The key variable left at its default, with no spec: the flag that changes it
    proc = lorafleet_cli(*synth, *teacher, cwd=tmp_path, env=_env())
    assert _one_error(proc) == (
        "--api-key-env: environment variable OPENAI_API_KEY is not set or empty "
        "(set it, or pass --api-key-env '' for a server that needs no key)"
    )
    # A key file the user typed that does not exist
    proc = lorafleet_cli(*synth, *teacher, "--api-key-file", "nokey.txt", cwd=tmp_path, env=_env())
    assert _one_error(proc) == ("--api-key-file: cannot read nokey.txt: No such file or directory")
    assert not (tmp_path / "s.jsonl").exists()


def test_teacher_errors_name_the_spec_field_when_the_spec_gave_it(
    lorafleet_cli: Callable, dead_url: str, tmp_path: Path
) -> None:
    # Given a spec whose expert has a teacher with no key
    (tmp_path / "fleet.yaml").write_text(
        f"""\
apiVersion: lorafleet/v1
name: t
experts:
  - name: job-analyzer
    task: job-analyzer
    seed_data: {DATA}/seed.jsonl
    eval_data: {DATA}/eval.jsonl
    synthesis:
      generator: teacher
      teacher: {{base_url: "{dead_url}", model: m, api_key_env: null}}
"""
    )
    spec = ("--spec", "fleet.yaml", "--expert", "job-analyzer")
    synth = ("data", "synthesize", str(DATA / "seed.jsonl"), "--out", "s.jsonl", *spec)
    proc = lorafleet_cli(*synth, cwd=tmp_path, env=_env())
    assert _one_error(proc) == (
        f"synthesis.teacher.base_url: {dead_url} is unreachable (Connection refused)"
    )
    # and the flag, once the user overrides it
    proc = lorafleet_cli(*synth, "--api-key-env", "LF_NO_SUCH_KEY", cwd=tmp_path, env=_env())
    assert _one_error(proc).startswith(
        "--api-key-env: environment variable LF_NO_SUCH_KEY is not set or empty"
    )
    assert not (tmp_path / "s.jsonl").exists()


def test_teacher_options_without_the_teacher_generator_are_refused(
    lorafleet_cli: Callable, dead_url: str, tmp_path: Path
) -> None:
    synth = ("data", "synthesize", str(DATA / "seed.jsonl"), "--out", "s.jsonl")
    teacher = ("--teacher-url", dead_url, "--teacher-model", "m")
    proc = lorafleet_cli(*synth, *teacher, "--judge-model", "j", cwd=tmp_path, env=_env())
    assert _one_error(proc) == (
        "--teacher-url: only the teacher generator uses it, and the generator is programmatic "
        "(the default): add --generator teacher, or leave --teacher-url out"
    )
    proc = lorafleet_cli(*synth, "--generator", "none", *teacher, cwd=tmp_path, env=_env())
    assert "the generator is none (--generator none)" in _one_error(proc)
    # A spec whose expert has a teacher block but synthesizes programmatically
    (tmp_path / "fleet.yaml").write_text(
        f"""\
apiVersion: lorafleet/v1
name: t
experts:
  - name: job-analyzer
    task: job-analyzer
    seed_data: {DATA}/seed.jsonl
    eval_data: {DATA}/eval.jsonl
    synthesis:
      teacher: {{base_url: "{dead_url}", model: m}}
"""
    )
    proc = lorafleet_cli(
        *synth, "--spec", "fleet.yaml", "--concurrency", "2", cwd=tmp_path, env=_env()
    )
    assert _one_error(proc) == (
        "--concurrency: only the teacher generator uses it, and the generator is programmatic "
        "(the --spec expert's synthesis.generator): add --generator teacher, or leave "
        "--concurrency out"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleet.yaml"]


def test_curate_checks_the_synthetic_ratio(lorafleet_cli: Callable, tmp_path: Path) -> None:
    files = ("--seeds", str(DATA / "seed.jsonl"), "--eval", str(DATA / "eval.jsonl"))
    proc = lorafleet_cli(
        "data", "curate", *files, "--out", "c.jsonl", "--max-synthetic-ratio", "-1",
        cwd=tmp_path, env=_env(),
    )  # fmt: skip
    assert _one_error(proc) == (
        "invalid option: --max-synthetic-ratio: Input should be greater than or equal to 0"
    )
    assert not list(tmp_path.iterdir())


def test_whole_file_findings_show_a_readable_value(lorafleet_cli: Callable, tmp_path: Path) -> None:
    # Given records with two different system prompts (a whole-file warning)
    records = [json.loads(line) for line in DATA.joinpath("seed.jsonl").read_text().splitlines()]
    records = records[:3]
    records[1]["messages"][0] = {"role": "system", "content": "Be terse."}
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = lorafleet_cli("data", "validate", "r.jsonl", cwd=tmp_path, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert (
        "warning: r.jsonl: system-prompt-varies: records use more than one system prompt "
        "(found 2)\n" in proc.stderr
    )
    assert "observed" not in proc.stderr and "np." not in proc.stderr


def test_judge_errors_name_the_flags_typed(
    lorafleet_cli: Callable, dead_url: str, tmp_path: Path
) -> None:
    # Any directories do: the judge is checked before a model loads
    (tmp_path / "base").mkdir()
    (tmp_path / "adapter").mkdir()
    run = ("eval", "run", "--base", "base", "--adapter", "adapter")
    run += ("--eval", str(DATA / "eval.jsonl"), "--judge-url", dead_url, "--judge-model", "j")
    proc = lorafleet_cli(*run, cwd=tmp_path, env=_env())
    assert _one_error(proc) == f"--judge-url: {dead_url} is unreachable (Connection refused)"
    proc = lorafleet_cli(*run, "--judge-key-env", "LF_NO_JUDGE_KEY", cwd=tmp_path, env=_env())
    assert _one_error(proc) == (
        "--judge-key-env: environment variable LF_NO_JUDGE_KEY is not set or empty "
        "(set it, or leave out --judge-key-env for a server that needs no key)"
    )
