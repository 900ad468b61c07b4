"""Continuous batching on the tiny demo base: rows join and leave a running batch.

Expected outputs are never hard-coded: every request, whenever it joined and whoever it
shared steps with, must get exactly what :meth:`Generator.generate` gives it alone
(greedy decoding), on both LoRA backends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lorafleet.engine.continuous import IDLE_PREFILL_FACTOR, Job, StepEngine
from lorafleet.engine.generation import GenerationRequest, GenerationResult, Generator
from lorafleet.errors import LorafleetError

LONG = "Analyze this job post: Python, SQL, Airflow, dbt, two weeks, remote, budget flexible. " * 3


def chat(text: str, adapter: str | None = None, **kwargs) -> GenerationRequest:
    return GenerationRequest(
        messages=[{"role": "user", "content": text}], adapter=adapter, **kwargs
    )


@dataclass
class Outcome:
    """What one request reported, and at which step."""

    result: GenerationResult | Exception | None = None
    deltas: list[str] = field(default_factory=list)
    first_step: int | None = None
    done_step: int | None = None


def drive(
    engine: StepEngine,
    arrivals: Sequence[tuple[int, GenerationRequest]],
    cancel: Callable[[int, Outcome], bool] = lambda i, outcome: False,
    max_steps: int = 500,
) -> list[Outcome]:
    """Submit ``request`` before step ``at`` for each ``(at, request)``, step until done."""
    outcomes = [Outcome() for _ in arrivals]
    step = 0

    def job(i: int, request: GenerationRequest) -> Job:
        outcome = outcomes[i]

        def done(result: GenerationResult | Exception) -> None:
            assert outcome.result is None, "reported twice"
            outcome.result, outcome.done_step = result, step

        def first() -> None:
            outcome.first_step = step

        return Job(request, done, outcome.deltas.append, first, lambda: cancel(i, outcome))

    while step < max_steps:
        for i, (at, request) in enumerate(arrivals):
            if at == step:
                engine.submit(job(i, request))
        if not engine.busy and step > max(at for at, _ in arrivals):
            return outcomes
        engine.step()
        step += 1
    raise AssertionError(f"not done after {max_steps} steps")


@pytest.fixture(scope="module", params=["batched", "peft"])
def generator(request, tiny_base: Path, tiny_adapters: dict[str, Path]) -> Generator:
    return Generator(tiny_base, tiny_adapters, lora_backend=request.param)


def alone(generator: Generator, request: GenerationRequest) -> GenerationResult:
    return generator.generate([request])[0]


def test_rows_joining_mid_decode_get_their_tokens_alone(generator: Generator) -> None:
    # Given mixed adapters, prompt lengths (one longer than the prefill budget), output
    # lengths and a stop string, arriving before and during decoding, with room for 3 rows
    arrivals = [
        (0, chat("Write a proposal.", None, max_new_tokens=20)),
        (0, chat("Write a proposal for a data engineer job.", "proposal-writer", max_new_tokens=6)),
        (0, chat(LONG, "job-analyzer", max_new_tokens=12)),
        (2, chat("Hi", "proposal-writer", max_new_tokens=1)),
        (3, chat("Review my profile.", "job-analyzer", max_new_tokens=9, stop=["e", "zz"])),
        (3, GenerationRequest(prompt="A client posts a job", max_new_tokens=7)),
        (7, chat("Write a proposal.", "job-analyzer", max_new_tokens=15)),
    ]
    engine = StepEngine(generator, max_rows=3, prefill_chunk_tokens=16)
    assert len(generator._prompt_ids(arrivals[2][1])) > 16  # prefilled in several chunks
    # When they run through the engine
    outcomes = drive(engine, arrivals)
    # Then each gets what it gets alone, streamed once, and nothing is left behind
    for (_, request), outcome in zip(arrivals, outcomes, strict=True):
        expected = alone(generator, request)
        assert outcome.result == expected
        assert "".join(outcome.deltas) == expected.text
        assert outcome.first_step is not None
    assert engine.running == engine.prefilling == engine.waiting == 0
    assert engine.cache_columns == 0
    assert max(engine.step_sizes) == 3  # rows shared decode steps, up to the cap
    # and rows joined while others were decoding (their first token came between another
    # row's first token and its last)
    joined = [
        (a, b) for a in outcomes for b in outcomes if a.first_step < b.first_step < a.done_step
    ]
    assert len(joined) >= 3


def test_prefill_is_chunked_so_running_rows_keep_decoding(generator: Generator) -> None:
    # Given one row decoding, then newcomers whose prompts exceed the budget of 8 tokens
    budget = 8
    engine = StepEngine(generator, max_rows=8, prefill_chunk_tokens=budget)
    passes: list[tuple[int, int]] = []  # (rows, columns) of each forward pass of a step
    steps: list[tuple[int, list[tuple[int, int]]]] = []
    forward = engine.forward

    def recording(jobs, **inputs):
        passes.append(tuple(inputs["input_ids"].shape))
        return forward(jobs, **inputs)

    engine.forward = recording
    step = engine.step

    def recorded_step() -> None:
        running = engine.running
        passes.clear()
        step()
        steps.append((running, list(passes)))

    engine.step = recorded_step
    arrivals = [
        (0, chat("Hi", "proposal-writer", max_new_tokens=30)),
        (3, chat(LONG, "job-analyzer", max_new_tokens=4)),
        (3, chat("Write a proposal for a data engineer job.", None, max_new_tokens=4)),
    ]
    outcomes = drive(engine, arrivals)
    # Then every step with running rows decodes them once, plus at most one prefill chunk
    # of at most the budget (padding included); with none running, nobody waits for a
    # larger one
    for running, step_passes in steps:
        if running:
            assert step_passes[0] == (running, 1)
            step_passes = step_passes[1:]
        assert len(step_passes) <= 1
        limit = budget if running else IDLE_PREFILL_FACTOR * budget
        assert all(rows * cols <= limit for rows, cols in step_passes)
    long_prompt = len(generator._prompt_ids(arrivals[1][1]))
    assert sum(1 for r, p in steps if r and len(p) == 2) >= long_prompt // budget
    for (_, request), outcome in zip(arrivals, outcomes, strict=True):
        assert outcome.result == alone(generator, request)


def test_a_cancelled_row_leaves_and_the_others_are_unchanged(generator: Generator) -> None:
    arrivals = [
        (0, chat("Write a proposal.", "proposal-writer", max_new_tokens=12)),
        (0, chat("Analyze the job.", "job-analyzer", max_new_tokens=12)),
    ]
    engine = StepEngine(generator)
    outcomes = drive(engine, arrivals, cancel=lambda i, o: i == 0 and len(o.deltas) >= 3)
    cut, expected = outcomes[0].result, alone(generator, arrivals[0][1])
    assert cut.finish_reason == "cancelled"
    assert 0 < cut.completion_tokens < expected.completion_tokens
    assert cut.token_ids == expected.token_ids[: cut.completion_tokens]
    assert outcomes[0].done_step < outcomes[1].done_step
    assert outcomes[1].result == alone(generator, arrivals[1][1])


def test_a_row_whose_forward_pass_raises_fails_alone(generator: Generator) -> None:
    # Given a request whose rows raise in any decode pass once it has 2 tokens (as a device
    # error would), and one whose rows raise in prefill
    engine = StepEngine(generator, prefill_chunk_tokens=64)
    forward = engine.forward
    calls: list[int] = []

    def poisoned(jobs, **inputs):
        calls.append(len(jobs))
        logits = forward(jobs, **inputs)
        for job in jobs:
            text = job.request.messages[0]["content"]
            decoding = inputs["input_ids"].shape[1] == 1 and len(job.row.token_ids) >= 2
            if ("POISON-DECODE" in text and decoding) or "POISON-PREFILL" in text:
                raise RuntimeError("CUDA error: device-side assert triggered (simulated)")
        return logits

    engine.forward = poisoned
    arrivals = [
        (0, chat("Write a proposal.", None, max_new_tokens=10)),
        (0, chat("POISON-DECODE", "job-analyzer", max_new_tokens=10)),
        (0, chat("Analyze the job.", "job-analyzer", max_new_tokens=10)),
        (2, chat("POISON-PREFILL", "proposal-writer", max_new_tokens=10)),
        (2, chat("Review my profile.", "proposal-writer", max_new_tokens=10)),
    ]
    # When they run together
    outcomes = drive(engine, arrivals)
    # Then the poisoned ones get the error, after the tokens they had; every other request
    # gets its tokens alone (no failed pass left anything in the cache)
    for i in (1, 3):
        assert isinstance(outcomes[i].result, RuntimeError)
    streamed = "".join(outcomes[1].deltas)  # its first tokens, before the failure
    assert streamed and alone(generator, arrivals[1][1]).text.startswith(streamed)
    assert outcomes[3].deltas == []
    for i in (0, 2, 4):
        assert outcomes[i].result == alone(generator, arrivals[i][1])
    assert 1 in calls  # the failing passes were split down to single rows


def test_a_request_that_cannot_start_fails_alone(generator: Generator) -> None:
    # Given a resolver that knows no "gone" adapter, and a chat the template cannot render
    def resolve(request: GenerationRequest) -> str:
        if request.adapter == "gone":
            raise LorafleetError("adapter 'gone' is not loaded")
        return generator._adapter_key(request.adapter)

    engine = StepEngine(generator, resolve=resolve)
    arrivals = [
        (0, chat("Write a proposal.", "gone", max_new_tokens=5)),
        (0, GenerationRequest(messages=[{"role": "user"}], max_new_tokens=5)),
        (0, chat("Write a proposal.", "proposal-writer", max_new_tokens=5)),
    ]
    outcomes = drive(engine, arrivals)
    assert isinstance(outcomes[0].result, LorafleetError)
    assert "content" in str(outcomes[1].result)  # the template's own error, for this one only
    assert outcomes[2].result == alone(generator, arrivals[2][1])


def test_columns_are_reclaimed_when_rows_leave(generator: Generator) -> None:
    # Given a long prompt that finishes at once and a short one that decodes on
    engine = StepEngine(generator, prefill_chunk_tokens=512)
    long_request = chat(LONG, "job-analyzer", max_new_tokens=2)
    short_request = chat("Hi", None, max_new_tokens=20)
    columns: list[int] = []
    step = engine.step

    def recorded_step() -> None:
        step()
        columns.append(engine.cache_columns)

    engine.step = recorded_step
    outcomes = drive(engine, [(0, long_request), (0, short_request)])
    long_prompt = len(generator._prompt_ids(long_request))
    short_prompt = len(generator._prompt_ids(short_request))
    # Then the cache is as wide as the long prompt while it runs, then shrinks to the short
    # row's own columns, and is freed at the end
    assert max(columns) >= long_prompt
    assert columns[-2] <= short_prompt + outcomes[1].result.completion_tokens
    assert columns[-1] == 0
    assert outcomes[1].result == alone(generator, short_request)


def test_an_aborted_adapter_fails_its_running_rows(generator: Generator) -> None:
    engine = StepEngine(generator)
    outcomes: list[GenerationResult | Exception] = []
    for request in (
        chat("Write a proposal.", "job-analyzer", max_new_tokens=30),
        chat("Write a proposal.", None, max_new_tokens=6),
    ):
        engine.submit(Job(request, outcomes.append))
    engine.step()
    engine.step()
    assert engine.keys_in_use() == {"job-analyzer", "__base__"}
    engine.abort({"job-analyzer"}, LorafleetError("adapter 'job-analyzer' was unloaded"))
    assert engine.keys_in_use() == {"__base__"}
    while engine.busy:
        engine.step()
    assert isinstance(outcomes[0], LorafleetError)
    assert outcomes[1] == alone(generator, chat("Write a proposal.", None, max_new_tokens=6))
