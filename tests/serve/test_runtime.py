"""The lorafleet runtime as a real server on 127.0.0.1, driven by the official ``openai`` client.

Expected answers come from :class:`Generator` in this process: the server must give
exactly what the shared generation code gives for the same request and adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx
import openai
import pytest

from lorafleet.engine.generation import GenerationRequest, Generator
from lorafleet.errors import LorafleetError
from lorafleet.fleet import ServingSpec
from lorafleet.serve.batching import MAX_BATCH_SIZE, PREFILL_CHUNK_TOKENS, ContinuousBatcher
from lorafleet.serve.model import LorafleetRuntime
from lorafleet.serve.runtime import main, run_server_subprocess

pytestmark = pytest.mark.integration

MAX_TOKENS = 12


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def generator(tiny_base: Path, tiny_adapters: dict[str, Path]) -> Generator:
    return Generator(tiny_base, tiny_adapters)


@pytest.fixture(scope="module")
def server(tiny_base: Path, tiny_adapters: dict[str, Path]) -> Iterator[str]:
    with run_server_subprocess(tiny_base, tiny_adapters) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{server}/openai/v1", api_key="unused", max_retries=0, timeout=60
    ) as c:
        yield c


def expected_text(generator: Generator, adapter: str | None, content: str) -> str:
    request = GenerationRequest(messages=user(content), adapter=adapter, max_new_tokens=MAX_TOKENS)
    return generator.generate([request])[0].text


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on ``port``, from the kernel's tables."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                host, port_hex = local.split(":")
                if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                    found.add(
                        socket.inet_ntoa(bytes.fromhex(host)[::-1]) if len(host) == 8 else host
                    )
    return found


def test_listens_on_loopback_only(server: str) -> None:
    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs Linux /proc/net/tcp")
    assert listening_addresses(urlparse(server).port) == {"127.0.0.1"}


def test_models_list_base_and_adapters_with_parent(
    client: openai.OpenAI, tiny_adapters: dict[str, Path]
) -> None:
    models = {m.id: m.model_dump() for m in client.models.list()}
    assert set(models) == {"base", *tiny_adapters}
    assert models["base"]["parent"] is None
    for name in tiny_adapters:
        assert models[name]["parent"] == "base"
        assert models[name]["root"] == name
    # no filesystem path reaches an anonymous caller
    listing = str(models)
    assert all(str(path) not in listing for path in tiny_adapters.values())
    assert "/" not in "".join(str(m["root"]) for m in models.values())


def test_chat_completion_per_adapter(client: openai.OpenAI, generator: Generator) -> None:
    answers = {}
    for name in ["base", *generator.adapters]:
        reply = client.chat.completions.create(
            model=name, messages=user("Write a proposal."), max_tokens=MAX_TOKENS
        )
        assert reply.model == name
        choice = reply.choices[0]
        assert choice.message.role == "assistant"
        assert choice.finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens <= MAX_TOKENS
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        answers[name] = choice.message.content
        assert answers[name] == expected_text(
            generator, None if name == "base" else name, "Write a proposal."
        )
    assert len(set(answers.values())) == len(answers), "each adapter should answer differently"


def test_streaming_chunks_add_up_to_the_whole_answer(client: openai.OpenAI) -> None:
    kwargs = {
        "model": "job-analyzer",
        "messages": user("Analyze this job post."),
        "max_tokens": MAX_TOKENS,
    }
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    texts = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(texts) > 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(texts) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_ignore_eos_fixes_the_length_and_a_stream_can_end_with_its_usage(
    client: openai.OpenAI,
) -> None:
    """vLLM's ``ignore_eos`` (what benchmarks use to give every server the same work) and
    OpenAI's ``stream_options.include_usage``."""
    kwargs = {"model": "job-analyzer", "messages": user("Analyze this job post."), "max_tokens": 48}
    natural = client.chat.completions.create(**kwargs)
    forced = client.chat.completions.create(**kwargs, extra_body={"ignore_eos": True})
    assert forced.usage.completion_tokens == 48 and forced.choices[0].finish_reason == "length"
    # Greedy: the same tokens up to where the model would have stopped.
    assert forced.choices[0].message.content.startswith(natural.choices[0].message.content)
    chunks = list(
        client.chat.completions.create(
            **kwargs,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 48
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == forced.choices[0].message.content


def test_completions_with_a_prompt(client: openai.OpenAI, generator: Generator) -> None:
    kwargs = {"model": "proposal-writer", "prompt": "A client posts a job", "max_tokens": 8}
    whole = client.completions.create(**kwargs).choices[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True))
    alone = generator.generate(
        [GenerationRequest(prompt=kwargs["prompt"], adapter="proposal-writer", max_new_tokens=8)]
    )
    assert whole.text == streamed == alone[0].text
    assert whole.finish_reason == alone[0].finish_reason


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-adapter", messages=user("hi"))
    assert err.value.status_code == 404
    assert err.value.code == "model_not_found"
    assert "no-such-adapter" in err.value.message


def test_unknown_model_strings_do_not_grow_the_metric_labels(
    server: str, client: openai.OpenAI
) -> None:
    # Given clients asking for models nobody serves, each a new string
    for i in range(5):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=f"made-up-{i}", messages=user("hi"))
    # Then they are counted, under one bounded label, not as five new series
    text = httpx.get(f"{server}/metrics", timeout=10).text
    assert "made-up-" not in text
    unknown = [
        line
        for line in text.splitlines()
        if line.startswith("lorafleet_requests_total{")
        and 'model="_unknown"' in line
        and 'status="404"' in line
    ]
    assert len(unknown) == 1 and float(unknown[0].rsplit(" ", 1)[1]) >= 5


def test_invalid_request_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="base", messages=[], max_tokens=4)
    assert err.value.param == "messages"


def test_concurrent_requests_from_threads(client: openai.OpenAI, generator: Generator) -> None:
    names = ["base", *generator.adapters]
    jobs = [(names[i % len(names)], f"Request {i}: write a proposal.") for i in range(8)]

    def ask(job: tuple[str, str]) -> str:
        name, content = job
        reply = client.chat.completions.create(
            model=name, messages=user(content), max_tokens=MAX_TOKENS
        )
        return reply.choices[0].message.content

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for (name, content), answer in zip(jobs, answers, strict=True):
        assert answer == expected_text(generator, None if name == "base" else name, content)


async def test_batcher_shares_decode_steps_up_to_its_cap(generator: Generator) -> None:
    # Given six requests submitted at once and at most four decoding at a time
    requests = [
        GenerationRequest(
            messages=user(f"Proposal {i}"),
            adapter=[None, *generator.adapters][i % 3],
            max_new_tokens=6,
        )
        for i in range(6)
    ]
    batcher = ContinuousBatcher(generator, max_batch_size=4, max_wait_s=0.05)
    try:
        # When they run through the batcher
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
    finally:
        batcher.close()
    # Then decode steps held up to four of them, never more, and each got its answer alone
    assert max(batcher.batch_sizes) == 4
    assert results == [generator.generate([r])[0] for r in requests]


def test_fleet_spec_and_runtime_share_the_batch_size_default() -> None:
    assert ServingSpec.model_fields["max_batch_size"].default == MAX_BATCH_SIZE
    assert LorafleetRuntime("base", "unused", {}).max_batch_size == MAX_BATCH_SIZE
    # `lorafleet serve` spells its default out (the CLI imports no serving code): keep it equal.
    import inspect

    from lorafleet.commands.serve import serve

    assert inspect.signature(serve).parameters["max_batch_size"].default == MAX_BATCH_SIZE
    assert inspect.signature(serve).parameters["prefill_chunk_tokens"].default == (
        PREFILL_CHUNK_TOKENS
    )
    assert LorafleetRuntime("base", "unused", {}).prefill_chunk_tokens == PREFILL_CHUNK_TOKENS


def test_adapter_may_not_take_the_base_name(
    tiny_base: Path, tiny_adapters: dict[str, Path]
) -> None:
    with pytest.raises(LorafleetError, match="base model's served name"):
        LorafleetRuntime("base", tiny_base, {"base": tiny_adapters["proposal-writer"]})


@pytest.mark.parametrize("adapters", [["no-equals-sign"], ["a=x", "a=y"]])
def test_command_line_rejects_bad_adapters(
    adapters: list[str], capsys: pytest.CaptureFixture
) -> None:
    argv = ["--base", "unused"] + [arg for a in adapters for arg in ("--adapter", a)]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "adapter" in capsys.readouterr().err


def test_command_line_refuses_a_bad_adapter_in_one_line(
    tiny_base: Path, tiny_adapters: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    argv = ["--base", str(tiny_base), "--max-rank", "4"]
    argv += ["--adapter", f"job-analyzer={tiny_adapters['job-analyzer']}"]  # rank 8
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "error: adapter 'job-analyzer' rejected (rank): rank 8 exceeds the server's max rank 4"
    )


def test_requests_over_the_server_limits_get_400_naming_the_limit(tiny_base: Path) -> None:
    limits = ["--max-tokens-limit", "16", "--max-prompt-chars", "200", "--max-body-bytes", "2000"]
    with (
        run_server_subprocess(tiny_base, {}, extra_args=limits) as url,
        openai.OpenAI(base_url=f"{url}/openai/v1", api_key="x", max_retries=0) as client,
    ):
        with pytest.raises(openai.BadRequestError) as budget:
            client.chat.completions.create(model="base", messages=user("hi"), max_tokens=17)
        assert budget.value.param == "max_tokens" and budget.value.code == "max_tokens_over_limit"
        assert "the limit is 16 (lorafleet serve --max-tokens-limit)" in budget.value.message
        with pytest.raises(openai.BadRequestError) as prompt:
            client.completions.create(model="base", prompt="x" * 201, max_tokens=2)
        assert prompt.value.param == "prompt" and "limit is 200" in prompt.value.message
        with pytest.raises(openai.BadRequestError) as chat:
            client.chat.completions.create(model="base", messages=user("y" * 300), max_tokens=2)
        assert chat.value.param == "messages"
        huge = httpx.post(
            f"{url}/openai/v1/chat/completions",
            content=b'{"model": "base", "messages": []' + b" " * 3000 + b"}",
            headers={"content-type": "application/json"},
            timeout=10,
        )
        assert huge.status_code == 400 and huge.json()["error"]["code"] == "body_too_large"
        # within every limit, and with no max_tokens (the default budget is capped too)
        ok = client.chat.completions.create(model="base", messages=user("hi"))
        assert ok.usage.completion_tokens <= 16
