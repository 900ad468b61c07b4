"""Batched greedy generation with mixed adapters, on the tiny demo base.

Expected outputs are never hard-coded: a row of a mixed batch is compared with the same
request run alone, which is what mixed-adapter batching promises, and the batched LoRA
backend with PEFT's ``adapter_names`` backend (the reference). Every test that takes the
``generator`` fixture runs on both backends.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from pathlib import Path

import pytest
import torch

from lorafleet.engine.generation import GenerationRequest, Generator
from lorafleet.errors import LorafleetError


def chat(text: str, adapter: str | None = None, **kwargs) -> GenerationRequest:
    return GenerationRequest(
        messages=[{"role": "user", "content": text}], adapter=adapter, **kwargs
    )


@pytest.fixture(scope="module", params=["batched", "peft"])
def generator(request, tiny_base: Path, tiny_adapters: dict[str, Path]) -> Generator:
    return Generator(tiny_base, tiny_adapters, lora_backend=request.param)


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


def test_generation_warns_about_nothing_it_passes_to_the_model(generator: Generator) -> None:
    # A served request must not log a deprecation (a legacy tuple KV cache, a renamed
    # forward argument): the server would print one per request.
    requests = [chat("Write a proposal.", n, max_new_tokens=4) for n in [None, *generator.adapters]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generator.generate(requests)
    cache = [str(w.message) for w in caught if "cache" in str(w.message).lower()]
    cache += [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert cache == []


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


@pytest.mark.parametrize("backend", ["batched", "peft"])
def test_add_and_remove_adapters(
    tiny_base: Path, tiny_adapters: dict[str, Path], backend: str
) -> None:
    gen = Generator(tiny_base, lora_backend=backend)
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


@pytest.mark.parametrize("kernel", ["grouped", "gather"])
def test_batched_backend_gives_the_reference_tokens(
    tiny_base: Path, tiny_adapters: dict[str, Path], kernel: str
) -> None:
    # Given a mixed batch: base rows and both adapters (ranks 4 and 8, different modules)
    names = [None, "job-analyzer", "proposal-writer", None, "proposal-writer", "job-analyzer"]
    requests = [
        chat(f"Request {i}: write a proposal for a data job.", n, max_new_tokens=10)
        for i, n in enumerate(names)
    ]
    # When the batched backend and PEFT's adapter_names backend run it
    batched = Generator(tiny_base, tiny_adapters, lora_kernel=kernel).generate(requests)
    reference = Generator(tiny_base, tiny_adapters, lora_backend="peft").generate(requests)
    # Then every row gets the same tokens
    assert [r.completion_tokens for r in batched] == [r.completion_tokens for r in reference]
    assert batched == reference


def test_peft_model_keeps_its_own_behaviour(
    tiny_base: Path, tiny_adapters: dict[str, Path]
) -> None:
    """The evaluator drives ``generator.model`` itself (``set_adapter``, ``disable_adapter``)
    for held-out loss: the batched backend's hooks must not change what it computes."""
    gen = Generator(tiny_base, tiny_adapters)
    model, prompt = gen.model, "A client posts a job"
    ids = gen.tokenizer(prompt, return_tensors="pt").input_ids  # what a prompt request sends
    for name in ["job-analyzer", "proposal-writer"]:
        model.set_adapter(name)
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, -1]
        # float32, same weights; only the LoRA matmul order differs (measured < 2e-6)
        expected = gen.next_token_logits(GenerationRequest(prompt=prompt, adapter=name))
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    with torch.inference_mode(), model.disable_adapter():
        base = model(input_ids=ids).logits[0, -1]
    assert torch.equal(base, gen.next_token_logits(GenerationRequest(prompt=prompt)))


def test_adapter_changes_wait_for_the_running_batch(
    tiny_base: Path, tiny_adapters: dict[str, Path]
) -> None:
    # Given a batch whose first streamed text starts a thread that unloads its adapter
    gen = Generator(tiny_base, tiny_adapters)
    request = chat("Write a proposal.", "job-analyzer", max_new_tokens=12)
    expected = gen.generate([request])[0]
    unload = threading.Thread(target=gen.remove_adapter, args=("job-analyzer",))
    waited: list[bool] = []

    def on_delta(i: int, text: str) -> None:
        if not waited:
            unload.start()
            unload.join(timeout=0.3)  # an unload that took no lock would be done by now
            waited.append(unload.is_alive())

    # When the batch runs
    result = gen.generate([request], on_delta=on_delta)[0]
    unload.join(timeout=30)
    # Then the unload waited for it, and the batch decoded with the adapter throughout
    assert waited == [True]
    assert result == expected
    assert "job-analyzer" not in gen.adapters
    assert set(gen.lora_bank.slots) == {"proposal-writer"}
