"""A pipeline step's teacher synthesis resumes after a retry: its work directory lives in the
profile's object store (a real S3-compatible server, moto), not on the step's lost disk."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from lorafleet.errors import LorafleetError
from lorafleet.fleet import ExpertSpec
from lorafleet.records import read_records
from lorafleet.stages import WORK_STORE_ENV, synthesize_stage
from lorafleet.storage import Storage

from ..conftest import S3_BUCKET

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "job-analyzer"


def _conversation(request: dict) -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": "Title: Build a booking page. Budget: $500."},
                {"role": "assistant", "content": "A new answer."},
            ]
        }
    )


def test_a_retried_step_asks_the_teacher_only_what_it_has_not_answered(
    tmp_path: Path, openai_stub, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(r.to_json() + "\n" for _, r in read_records(DATA / "seed.jsonl")[:6]))
    expert = ExpertSpec(
        name="ja",
        task="job-analyzer",
        seed_data=str(seeds),
        eval_data=str(seeds),
        synthesis={
            "generator": "teacher",
            "per_seed": 1,
            "teacher": {
                "base_url": openai_stub.url,
                "model": "teacher",
                "api_key_env": None,
                "concurrency": 1,
                "max_retries": 0,
            },
        },
    )
    monkeypatch.setenv(WORK_STORE_ENV, f"s3://{S3_BUCKET}/synth-resume/work")
    storage = Storage(s3_endpoint_url=s3_endpoint, pvc_mounts={})
    openai_stub.answer = _conversation
    # The first attempt: three answers, then the teacher refuses everything (the pod dies)
    refusal = (400, {"error": {"message": "no", "type": "invalid_request_error"}}, {})
    openai_stub.script = [(200, openai_stub.completion(_conversation({}), "teacher"), {})] * 3
    openai_stub.script += [refusal] * 20
    # a step that fails here is retried by KFP: what it stored must survive
    with contextlib.suppress(LorafleetError):
        synthesize_stage(expert, seeds, tmp_path / "first.jsonl", storage=storage)
    first = len(openai_stub.requests)
    kept = storage.list_prefix(f"s3://{S3_BUCKET}/synth-resume/work/synthesize/ja")
    assert kept, "the work directory was not kept in the store"
    # The retry, on a fresh disk: only the jobs without an answer are asked again
    openai_stub.script = []
    stats = synthesize_stage(expert, seeds, tmp_path / "retry.jsonl", storage=storage)
    asked_again = len(openai_stub.requests) - first
    assert asked_again == 6 - 3, (first, asked_again)
    assert (stats["jobs"], stats["resumed"], stats["requested"]) == (6, 3, 3)
    assert stats["request_failures"] == {}
    # A third run of the same step asks nothing at all
    before = len(openai_stub.requests)
    synthesize_stage(expert, seeds, tmp_path / "again.jsonl", storage=storage)
    assert len(openai_stub.requests) == before
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "retry.jsonl").read_text()
