"""The teacher generator against the project's own OpenAI-compatible server (no mock).

The server runs the tiny test base, whose greedy output is gibberish: every answer must
come back, be stored, fail to parse and be counted as a drop. A run killed mid-way and
started again must end with exactly the answers and the result of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorafleet.data.synth import synthesize
from lorafleet.data.teacher import TeacherGenerator
from lorafleet.errors import LorafleetError
from lorafleet.fleet import SynthesisSettings, TeacherSettings
from lorafleet.records import read_records

pytestmark = pytest.mark.integration

SEED_FILE = (
    Path(__file__).resolve().parents[2] / "examples" / "data" / "job-analyzer" / "seed.jsonl"
)
SEEDS = [r for _, r in read_records(SEED_FILE)]


@pytest.fixture(scope="module")
def teacher_url(tiny_base: Path):
    from lorafleet.serve.runtime import run_server_subprocess

    with run_server_subprocess(tiny_base, {}) as url:
        yield url + "/openai/v1"


def _settings(url: str, **over) -> TeacherSettings:
    # Concurrency 1 where runs are compared: one request at a time keeps greedy decoding bit-identical.
    # The local runtime needs no key: no key source (a named one would have to be set).
    return TeacherSettings(
        **{
            "base_url": url,
            "model": "base",
            "max_tokens": 12,
            "timeout_s": 30,
            "api_key_env": None,
            **over,
        }
    )


def _answers(work_dir: Path) -> dict[str, str]:
    entries = [
        json.loads(line)
        for p in sorted(work_dir.glob("shard-*.jsonl"))
        for line in p.read_text().splitlines()
    ]
    answers = {e["key"]: e["response"] for e in entries}
    assert len(answers) == len(entries), "a finished job was requested twice"
    return answers


def _stored_lines(work_dir: Path) -> int:
    """Complete lines in the shards (safe to call while a writer appends)."""
    return sum(p.read_bytes().count(b"\n") for p in work_dir.glob("shard-*.jsonl"))


def test_gibberish_is_stored_parsed_and_counted(teacher_url: str, tmp_path: Path) -> None:
    gen = TeacherGenerator(_settings(teacher_url, concurrency=3), "job-analyzer", tmp_path)
    records = list(gen.generate(SEEDS[:4], 2))
    assert gen.stats["jobs"] == gen.stats["requested"] == 8 and gen.stats["request_failures"] == {}
    assert len(_answers(tmp_path)) == 8  # every answer reached the shards
    assert records == [] and sum(gen.stats["dropped"].values()) == 8
    assert set(gen.stats["dropped"]) <= {"no-json", "bad-shape"}
    # A second run finds everything done and asks the server nothing.
    again = TeacherGenerator(_settings(teacher_url, concurrency=3), "job-analyzer", tmp_path)
    list(again.generate(SEEDS[:4], 2))
    assert (again.stats["resumed"], again.stats["requested"]) == (8, 0)


def test_an_unknown_model_fails_without_retries(
    teacher_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gen = TeacherGenerator(
        _settings(teacher_url, model="no-such-model", backoff_s=0.01), "job-analyzer", tmp_path
    )
    # every request failed: that is an error, not "0 synthetic records"
    with (
        caplog.at_level(logging.INFO, logger="lorafleet"),
        pytest.raises(
            LorafleetError, match=r"^synthesis.teacher.base_url: all 2 requests to .* failed"
        ),
    ):
        list(gen.generate(SEEDS[:2], 1))
    assert "HTTP 404" in caplog.text and "retry" not in caplog.text
    assert _answers(tmp_path) == {}


def test_an_unreachable_endpoint_fails_in_seconds_naming_the_url(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    gen = TeacherGenerator(_settings(url, max_retries=4, backoff_s=1.0), "job-analyzer", tmp_path)
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="lorafleet"), pytest.raises(LorafleetError) as err:
        list(gen.generate(SEEDS[:30], 1))
    # one line naming the setting and the URL, before any request or retry
    assert (
        str(err.value) == f"synthesis.teacher.base_url: {url} is unreachable (Connection refused)"
    )
    assert "retry" not in caplog.text and time.monotonic() - start < 10


def test_a_killed_run_resumes_to_the_same_result(teacher_url: str, tmp_path: Path) -> None:
    seeds, per_seed = SEEDS[:20], 2
    seed_file = tmp_path / "seeds.jsonl"
    seed_file.write_text("".join(r.to_json() + "\n" for r in seeds))
    teacher = _settings(teacher_url, concurrency=1)
    spec = tmp_path / "fleet.yaml"
    spec.write_text(
        json.dumps(
            {  # JSON is YAML
                "name": "t",
                "experts": [
                    {
                        "name": "ja",
                        "task": "job-analyzer",
                        "seed_data": "seeds.jsonl",
                        "eval_data": "seeds.jsonl",
                        "synthesis": {
                            "generator": "teacher",
                            "per_seed": per_seed,
                            "teacher": teacher.model_dump(mode="json"),
                        },
                    }
                ],
            }
        )
    )
    # Given an uninterrupted reference run
    settings = SynthesisSettings(generator="teacher", per_seed=per_seed, teacher=teacher)
    reference = synthesize(seeds, settings, "job-analyzer", work_dir=tmp_path / "ref")
    # When the CLI run is killed once some answers are stored
    out, work = tmp_path / "syn.jsonl", tmp_path / "work"
    cmd = [
        sys.executable,
        "-m",
        "lorafleet.cli",
        "data",
        "synthesize",
        str(seed_file),
        "--out",
        str(out),
        "--spec",
        str(spec),
        "--expert",
        "ja",
        "--work-dir",
        str(work),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _stored_lines(work) < 5:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stored = len(_answers(work))
    assert 5 <= stored < len(seeds) * per_seed and not out.exists()
    # (and a write was torn by the kill)
    with open(sorted(work.glob("shard-*.jsonl"))[0], "ab") as fh:
        fh.write(b'{"key": "torn", "resp')
    # Then the same command finishes the rest, and the result equals the reference
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _answers(work) == _answers(tmp_path / "ref")
    assert [r.to_json() for _, r in read_records(out)] == [r.to_json() for r in reference.records]
    assert f"wrote {out}: {len(reference.records)} synthetic records" in done.stderr.replace(
        "\n", ""
    )
