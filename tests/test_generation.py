"""Batched greedy generation with mixed adapters, on the tiny demo base.

Expected outputs are never hard-coded: a row of a mixed batch is compared with the same
request run alone, which is what mixed-adapter batching promises.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lorafleet.errors import LorafleetError
from lorafleet.generation import GenerationRequest, Generator


def chat(text: str, adapter: str | None = None, **kwargs) -> GenerationRequest:
    return GenerationRequest(
        messages=[{"role": "user", "content": text}], adapter=adapter, **kwargs
    )


@pytest.fixture(scope="module")
def generator(tiny_base: Path, tiny_adapters: dict[str, Path]) -> Generator:
    return Generator(tiny_base, tiny_adapters)


def test_mixed_batch_rows_equal_single_runs(generator: Generator) -> None:
    # Given prompts of different lengths (so rows are padded) for the base and both adapters
    requests = [
        chat("Write a proposal.", None, max_new_tokens=12),
        chat("Write a proposal for a data engineer job.", "proposal-writer", max_new_tokens=12),
        chat("Analyze this job post: Python, SQL, two weeks.", "job-analyzer", max_new_tokens=12),
        chat("Hi", "proposal-writer", max_new_tokens=5),
    ]
    # When they run as one batch and one by one
    batched = generator.generate(requests)
    alone = [generator.generate([r])[0] for r in requests]
    # Then every row gets the same tokens and text as alone
    assert len(batched) == len(requests)
    for b, a in zip(batched, alone, strict=True):
        assert b.completion_tokens > 0
        assert b.token_ids == a.token_ids
        assert b.text == a.text
        assert b.prompt_tokens == a.prompt_tokens
        assert b.finish_reason == a.finish_reason


def test_base_and_adapters_differ(generator: Generator) -> None:
    names = [None, *generator.adapters]
    results = generator.generate([chat("Write a proposal.", n, max_new_tokens=8) for n in names])
    outputs = {tuple(r.token_ids) for r in results}
    assert len(outputs) == len(names)


def test_deterministic_across_calls_and_instances(
    generator: Generator, tiny_base: Path, tiny_adapters: dict[str, Path]
) -> None:
    requests = [chat("Review my profile.", n, max_new_tokens=10) for n in [None, *tiny_adapters]]
    first = generator.generate(requests)
    assert generator.generate(requests) == first
    assert Generator(tiny_base, tiny_adapters).generate(requests) == first


def test_max_new_tokens_respected_per_row(generator: Generator) -> None:
    limits = [1, 4, 9]
    results = generator.generate(
        [chat("Write a proposal.", "job-analyzer", max_new_tokens=n) for n in limits]
    )
    for result, limit in zip(results, limits, strict=True):
        assert result.completion_tokens <= limit
        if result.finish_reason == "length":
            assert result.completion_tokens == limit
        else:
            assert result.token_ids[-1] == generator.tokenizer.eos_token_id
    assert {r.finish_reason for r in results} == {"length"}


def test_stop_string_cuts_text(generator: Generator) -> None:
    # Given the text the adapter writes without stop strings
    request = chat("Write a proposal.", "job-analyzer", max_new_tokens=16)
    free = generator.generate([request])[0]
    stop = free.text[3:5]
    assert len(stop) == 2
    # When a stop string from the middle of that text is set
    cut = generator.generate([dataclasses.replace(request, stop=[stop, "never-written"])])[0]
    # Then generation ends at its first occurrence, which is not part of the text
    assert cut.finish_reason == "stop"
    assert 0 < len(cut.text) < len(free.text)
    assert cut.text == free.text[: free.text.find(stop)]
    assert cut.token_ids == free.token_ids[: cut.completion_tokens]


def test_deltas_add_up_to_text(generator: Generator) -> None:
    requests = [
        chat("Write a proposal.", "proposal-writer", max_new_tokens=16),
        chat("Analyze the job.", "job-analyzer", max_new_tokens=10, stop=["e", "zz"]),
        GenerationRequest(prompt="A client posts a job", max_new_tokens=7),
    ]
    deltas: dict[int, list[str]] = {i: [] for i in range(len(requests))}
    results = generator.generate(requests, on_delta=lambda i, text: deltas[i].append(text))
    for i, result in enumerate(results):
        assert deltas[i], f"request {i} streamed nothing"
        assert "".join(deltas[i]) == result.text


def test_add_and_remove_adapters(tiny_base: Path, tiny_adapters: dict[str, Path]) -> None:
    gen = Generator(tiny_base)
    request = chat("Write a proposal.", max_new_tokens=8)
    base_alone = gen.generate([request])[0]
    name, path = next(iter(tiny_adapters.items()))

    gen.add_adapter(name, path)
    assert list(gen.adapters) == [name]
    assert gen.generate([request])[0] == base_alone
    assert gen.generate([chat("Write a proposal.", name, max_new_tokens=8)])[0] != base_alone

    gen.remove_adapter(name)
    assert gen.adapters == {}
    assert gen.generate([request])[0] == base_alone
    with pytest.raises(LorafleetError, match="unknown adapter"):
        gen.generate([chat("Write a proposal.", name)])


def test_bad_adapters_are_refused(generator: Generator, tmp_path: Path) -> None:
    with pytest.raises(LorafleetError, match=r"no adapter_config\.json"):
        generator.add_adapter("empty", tmp_path)
    with pytest.raises(LorafleetError, match="already loaded"):
        generator.add_adapter("proposal-writer", generator.adapters["proposal-writer"])
    with pytest.raises(LorafleetError, match="unknown adapter 'nope'"):
        generator.remove_adapter("nope")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"prompt": ""},
        {"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
        {"prompt": "x", "max_new_tokens": 0},
    ],
)
def test_invalid_requests(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        GenerationRequest(**kwargs)


def test_cancelled_rows_stop_and_the_others_are_unchanged(generator: Generator) -> None:
    # Given a batch where row 0 is cancelled after its third token
    requests = [
        chat("Write a proposal.", "proposal-writer", max_new_tokens=12),
        chat("Analyze the job.", "job-analyzer", max_new_tokens=12),
    ]
    alone = [generator.generate([r])[0] for r in requests]
    tokens = {0: 0}

    def count(i: int, text: str) -> None:
        tokens[0] += i == 0

    def is_cancelled(i: int) -> bool:
        return i == 0 and tokens[0] >= 3

    # When the batch runs
    results = generator.generate(requests, on_delta=count, is_cancelled=is_cancelled)
    # Then row 0 stopped early and row 1 got what it gets alone
    assert results[0].finish_reason == "cancelled"
    assert results[0].completion_tokens < alone[0].completion_tokens
    assert results[0].token_ids == alone[0].token_ids[: results[0].completion_tokens]
    assert results[1] == alone[1]


def test_next_token_logits_match_the_first_generated_token(generator: Generator) -> None:
    for adapter in [None, *generator.adapters]:
        request = chat("Write a proposal.", adapter, max_new_tokens=1)
        logits = generator.next_token_logits(request)
        assert logits.shape == (generator.model.config.vocab_size,)
        assert int(logits.argmax()) == generator.generate([request])[0].token_ids[0]
