"""The teacher generator's own logic: planning, parsing, judging, assembling, resuming.

These run on hand-written teacher answers: without a server, or served by a scripted
OpenAI-compatible server (the ``openai_stub`` fixture) where an answer must be malformed or a
key must arrive; the same code against the project's real server is tested in
test_teacher_server.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafleet.data.teacher import (
    TeacherGenerator,
    load_done,
    parse_response,
    parse_score,
    plan_jobs,
)
from lorafleet.errors import LorafleetError
from lorafleet.fleet import JudgeSettings, TeacherSettings
from lorafleet.records import Record, read_records

SEEDS = [
    r
    for _, r in read_records(
        Path(__file__).resolve().parents[2] / "examples" / "data" / "job-analyzer" / "seed.jsonl"
    )
]
TEACHER = TeacherSettings(base_url="http://127.0.0.1:9/v1", model="teacher-m")
ANALYSIS = {
    "skills": ["Go"],
    "deliverables": ["An API"],
    "budget": {"type": "fixed", "min": 900, "max": 900, "currency": "USD"},
    "timeline": "3 weeks",
    "open_questions": ["Which cloud?"],
}


def answer(
    question: str = "We need a Go API for our parcel lockers, $900, 3 weeks.",
    reply: object = ANALYSIS,
) -> str:
    content = reply if isinstance(reply, str) else json.dumps(reply)
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": content},
            ]
        }
    )


def test_jobs_are_deterministic_grounded_and_shard_independent() -> None:
    jobs = plan_jobs(SEEDS, 2, "job-analyzer", TEACHER, seed=0)
    assert len(jobs) == 2 * len(SEEDS) and len({j.key for j in jobs}) == len(jobs)
    assert [j.key for j in jobs] == [
        j.key for j in plan_jobs(SEEDS, 2, "job-analyzer", TEACHER, seed=0)
    ]
    assert [j.key for j in jobs] != [
        j.key for j in plan_jobs(SEEDS, 2, "job-analyzer", TEACHER, seed=1)
    ]
    first = jobs[0]
    assert (
        first.example_ids[0] == SEEDS[0].id
        and len(first.example_ids) == TEACHER.examples_per_prompt
    )
    # The prompt shows the seeds' real conversations.
    assert SEEDS[0].messages[1].content[:60] in first.messages[1]["content"]
    # A shard planned against the whole pool gets exactly the unsharded jobs.
    shard = plan_jobs(SEEDS[1::3], 2, "job-analyzer", TEACHER, seed=0, pool=SEEDS)
    by_key = {j.key: j for j in jobs}
    assert all(by_key[j.key].messages == j.messages for j in shard)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("\n\n\n hello hello", "no-json"),
        ("[1, 2]", "no-json"),
        ('{"conversation": []}', "bad-shape"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "bad-shape"),
        (
            '{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}',
            "bad-shape",
        ),
        ('{"messages": [{"role": "user"}]}', "bad-shape"),
    ],
)
def test_unusable_answers_name_their_reason(text: str, reason: str) -> None:
    job = plan_jobs(SEEDS[:2], 1, "job-analyzer", TEACHER, seed=0)[0]
    assert parse_response(text, job, SEEDS[0], "job-analyzer", "teacher-m") == reason


def test_an_answer_in_prose_and_fences_becomes_a_record_with_provenance() -> None:
    job = plan_jobs(SEEDS[:3], 1, "job-analyzer", TEACHER, seed=0)[0]
    rec = parse_response(
        f"Sure! Here it is:\n```json\n{answer()}\n```", job, SEEDS[0], "job-analyzer", "teacher-m"
    )
    assert isinstance(rec, Record)
    assert rec.messages[0] == SEEDS[0].messages[0]  # the expert's system prompt is kept
    assert [m.role for m in rec.messages] == ["system", "user", "assistant"]
    assert rec.source == "synthetic"
    assert rec.meta == {
        "generator": "teacher",
        "teacher_model": "teacher-m",
        "seed_ids": list(job.example_ids),
        "job": job.key,
    }


@pytest.mark.parametrize(
    ("text", "score"),
    [("5", 5), ("Score: 4/5", 4), ("I'd say 2.", 2), ("10", None), ("great", None)],
)
def test_judge_scores(text: str, score: int | None) -> None:
    assert parse_score(text) == score


def test_assembly_counts_every_drop_and_keeps_job_order(tmp_path: Path) -> None:
    # Given finished jobs: good, low score, unparseable score, gibberish, wrong JSON schema, one missing
    seeds = SEEDS[:6]
    gen = TeacherGenerator(TEACHER, "job-analyzer", tmp_path, judge=JudgeSettings(min_score=4))
    jobs = plan_jobs(seeds, 1, "job-analyzer", TEACHER, seed=0)
    responses = [
        (answer(), "5"),
        (answer("Need a logo, $200."), "2"),
        (answer("Need a blog, $300."), "hmm"),
        ("lorem ipsum", None),
        (answer("Need Go help, $500.", {"skills": "Go"}), "5"),
    ]
    done = {
        j.key: {"key": j.key, "index": j.index, "response": r, **({"judge": s} if s else {})}
        for j, (r, s) in zip(jobs, responses, strict=False)
    }
    # When assembled
    records, drops = gen.assemble(jobs, {s.id: s for s in seeds}, dict(reversed(done.items())))
    # Then only the good one is kept, with its score, and every other job has a reason
    assert [r.meta["job"] for r in records] == [jobs[0].key]
    assert records[0].meta["judge_score"] == 5
    assert drops == {
        "judge-low-score": 1,
        "judge-unparseable": 1,
        "no-json": 1,
        "answer-schema": 1,
        "not-finished": 1,
    }


def test_a_torn_last_line_is_cut_off(tmp_path: Path) -> None:
    shard = tmp_path / "shard-00000.jsonl"
    shard.write_bytes(b'{"key": "a", "index": 0, "response": "x"}\n{"key": "b", "ind')
    assert list(load_done(tmp_path)) == ["a"]
    assert shard.read_bytes() == b'{"key": "a", "index": 0, "response": "x"}\n'


def test_a_work_directory_of_other_settings_is_refused(tmp_path: Path) -> None:
    jobs = plan_jobs(SEEDS[:2], 1, "job-analyzer", TEACHER, seed=0)
    TeacherGenerator(TEACHER, "job-analyzer", tmp_path)._open_work_dir(jobs)
    other = TEACHER.model_copy(update={"temperature": 0.1})
    with pytest.raises(LorafleetError, match="other seeds or settings"):
        TeacherGenerator(other, "job-analyzer", tmp_path)._open_work_dir(jobs)


def test_a_malformed_answer_fails_its_job_and_the_run_goes_on(openai_stub, tmp_path: Path) -> None:
    # Given a teacher whose first answer is a 200 without choices, and good answers after it
    openai_stub.script = [(200, {"choices": []}, {})]
    openai_stub.answer = lambda request: answer(
        f"Need a Go API for lockers, job {request['seed']}."
    )
    secret = tmp_path / "api-key"
    secret.write_text("from-secret\n")
    settings = TEACHER.model_copy(
        update={"base_url": openai_stub.url, "concurrency": 2, "api_key_file": secret}
    )
    seeds = SEEDS[:4]
    # When a run of four jobs goes through
    gen = TeacherGenerator(settings, "job-analyzer", tmp_path / "work")
    records = list(gen.generate(seeds, 1))
    # Then that one job failed, the other three were kept, and the key reached the server
    assert gen.stats["request_failures"] == {"request-failed": 1}
    assert gen.stats["dropped"] == {"not-finished": 1} and len(records) == 3
    assert {r["authorization"] for r in openai_stub.requests} == {"Bearer from-secret"}
    # And a rerun asks for only that job again
    again = TeacherGenerator(settings, "job-analyzer", tmp_path / "work")
    assert len(list(again.generate(seeds, 1))) == 4
    assert (again.stats["resumed"], again.stats["requested"]) == (3, 1)
    assert len(openai_stub.requests) == 5
