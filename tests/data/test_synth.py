"""Seed-grounded synthesis: deterministic, and facts change consistently across turns."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lorafleet.data.synth import ProgrammaticGenerator, synthesize
from lorafleet.fleet import SynthesisSettings
from lorafleet.records import Record, read_records

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


def _seeds(expert: str) -> list[Record]:
    return [r for _, r in read_records(DATA / expert / "seed.jsonl")]


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    seeds = _seeds("proposal-writer")[:5]
    a = synthesize(seeds, SynthesisSettings(per_seed=2, seed=1)).records
    b = synthesize(seeds, SynthesisSettings(per_seed=2, seed=1)).records
    c = synthesize(seeds, SynthesisSettings(per_seed=2, seed=2)).records
    assert [r.model_dump() for r in a] == [r.model_dump() for r in b]
    assert [r.messages for r in a] != [r.messages for r in c]


def test_variants_are_new_synthetic_and_traceable() -> None:
    seeds = _seeds("job-post-writer")
    result = synthesize(seeds, SynthesisSettings(per_seed=2), "job-post-writer")
    out = result.records
    assert result.stats == {"generator": "programmatic", "records": len(out)}
    assert len(out) >= len(seeds)  # most seeds have something to vary
    by_id = {s.id: s for s in seeds}
    assert len({r.id for r in out}) == len(out)
    for r in out:
        seed = by_id[r.meta["seed_ids"][0]]
        assert r.source == "synthetic" and r.meta["generator"] == "programmatic"
        assert [m.role for m in r.messages] == [m.role for m in seed.messages]
        assert r.messages != seed.messages


def test_job_analyzer_budget_changes_in_question_and_answer_alike() -> None:
    # Given a post with a fixed budget, every variant's JSON answer must carry the new amount.
    seed = Record(
        id="s1",
        task="job-analyzer",
        source="human",
        messages=[
            {"role": "user", "content": "Need a React dashboard in 3 weeks, budget is $2,400."},
            {
                "role": "assistant",
                "content": json.dumps(
                    {
                        "skills": ["React"],
                        "budget": {"type": "fixed", "min": 2400, "max": 2400},
                        "timeline": "3 weeks",
                    }
                ),
            },
        ],
    )
    variants = list(ProgrammaticGenerator(seed=7).generate([seed], per_seed=4))
    assert variants
    for v in variants:
        question, answer = v.messages[0].content, json.loads(v.messages[1].content)
        amount = int(re.search(r"\$([\d,]+)", question).group(1).replace(",", ""))
        weeks = re.search(r"(\d+) weeks?", question).group(1)
        assert answer["budget"]["min"] == answer["budget"]["max"] == amount
        assert answer["timeline"].startswith(weeks)
        assert answer["skills"][0] in question


def test_programmatic_variants_pass_the_task_suite() -> None:
    # The JSON answers are rewritten consistently, so they still match the job-analyzer schema.
    from lorafleet.data.validate import validate_records

    out = synthesize(_seeds("job-analyzer"), SynthesisSettings(per_seed=2), "job-analyzer").records
    report = validate_records(out, "job-analyzer")
    assert out and report.success, report.lines()[:3]


def test_teacher_needs_a_work_directory() -> None:
    from lorafleet.errors import LorafleetError
    from lorafleet.fleet import TeacherSettings

    settings = SynthesisSettings(
        generator="teacher", teacher=TeacherSettings(base_url="http://127.0.0.1:9/v1", model="m")
    )
    with pytest.raises(LorafleetError, match="work directory"):
        synthesize(_seeds("job-analyzer")[:1], settings, "job-analyzer")
