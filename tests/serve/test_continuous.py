"""The runtime's continuous batcher: requests join and leave a running batch, adapter
versions change under running requests, and the time to first token is exported.

A real runtime (tiny base, real adapters) is driven in process. Expected answers come from
a :class:`Generator` on the same adapters: the runtime must give what each request gets
alone. To act between two steps at a known point, a test holds the batcher's worker
in an after-step hook (:class:`Hold`) while it queues an adapter change.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lorafleet.engine.generation import GenerationRequest, Generator
from lorafleet.errors import LorafleetError
from lorafleet.serve.batching import ContinuousBatcher, Overloaded
from lorafleet.serve.model import LorafleetRuntime, build_runtime

pytestmark = pytest.mark.asyncio(loop_scope="module")


def chat(text: str, adapter: str | None = None, max_new_tokens: int = 6) -> GenerationRequest:
    return GenerationRequest(
        messages=[{"role": "user", "content": text}],
        adapter=adapter,
        max_new_tokens=max_new_tokens,
    )


class Hold:
    """After-step hook: once ``when()`` is true, hold the worker until :meth:`release`."""

    def __init__(self, when: Callable[[], bool]) -> None:
        self.when = when
        self.held = threading.Event()
        self.released = threading.Event()

    def __call__(self) -> None:
        if not self.held.is_set() and self.when():
            self.held.set()
            self.released.wait(30)

    async def reached(self) -> None:
        assert await asyncio.to_thread(self.held.wait, 30), "the worker never got there"

    def release(self) -> None:
        self.released.set()


@pytest.fixture(scope="module")
def generator(tiny_base: Path, fleet_adapters: dict[str, Path]) -> Generator:
    """The reference: expert-2 and expert-3 (a writer's two versions) and the base."""
    return Generator(
        tiny_base, {n: fleet_adapters[n] for n in ("expert-2", "expert-3")}, lora_backend="peft"
    )


@pytest.fixture
def runtime(tiny_base: Path, fleet_adapters: dict[str, Path]) -> Iterator[LorafleetRuntime]:
    served = build_runtime(tiny_base, {"writer": fleet_adapters["expert-2"]}, max_wait_s=0)
    yield served
    served.batcher.close()


async def test_a_request_joins_the_running_batch_and_leaves_when_done(
    generator: Generator,
) -> None:
    # Given a long request decoding
    long_request = chat("Write a long proposal.", None, max_new_tokens=40)
    short_request = chat("Hi", "expert-3", max_new_tokens=3)
    expected_long = generator.generate([long_request])[0]
    assert expected_long.completion_tokens == 40
    batcher = ContinuousBatcher(generator, max_wait_s=0)
    try:
        deltas: list[str] = []
        started = asyncio.Event()

        def on_delta(text: str) -> None:
            deltas.append(text)
            started.set()

        long_task = asyncio.ensure_future(batcher.submit(long_request, on_delta))
        await asyncio.wait_for(started.wait(), 30)
        # When a short one arrives while it decodes
        short = await batcher.submit(short_request)
        # Then the short one is answered while the long one still runs, and both get what
        # they get alone
        assert not long_task.done()
        assert short == generator.generate([short_request])[0]
        assert await long_task == expected_long
        assert "".join(deltas) == expected_long.text
        assert max(batcher.batch_sizes) == 2
    finally:
        batcher.close()


async def test_time_to_first_token_is_exported(runtime: LorafleetRuntime) -> None:
    await asyncio.gather(
        runtime.generate(chat("Write a proposal.", "writer")),
        runtime.generate(chat("Write a proposal.", "writer")),
        runtime.generate(chat("Write a proposal.")),
    )
    exposition = generate_latest(runtime.metrics.registry).decode()
    counts = {
        s.labels["adapter"]: s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        if s.name == "lorafleet_time_to_first_token_seconds_count"
    }
    assert counts == {"writer": 2, "base": 1}


async def test_a_replaced_version_answers_its_running_requests_to_the_end(
    runtime: LorafleetRuntime, generator: Generator, fleet_adapters: dict[str, Path]
) -> None:
    # Given a request for writer v1 (expert-2's weights) three decode steps into its answer
    request = chat("Write a long proposal.", "writer", max_new_tokens=30)
    deltas: list[str] = []
    hold = Hold(lambda: runtime.batcher.batch_sizes.total() >= 3)
    runtime.batcher.after_each_step(hold)
    running = asyncio.ensure_future(runtime.generate(request, deltas.append))
    await hold.reached()
    # When v2 (expert-3's weights) is loaded under the same name between two steps
    load = asyncio.ensure_future(runtime.load_adapter("writer", fleet_adapters["expert-3"]))
    while not runtime.batcher._exclusive:  # its files are checked off the worker first
        await asyncio.sleep(0.01)
    hold.release()
    await load
    # Then the running request ends on v1, new requests get v2, and v1 is unloaded once
    # nobody runs on it
    v1 = generator.generate([chat("Write a long proposal.", "expert-2", 30)])[0]
    assert (await running).text == v1.text == "".join(deltas)
    assert runtime.batcher.batch_sizes.total() > 3  # it did decode on after the switch
    new = await runtime.generate(chat("Write a proposal.", "writer"))
    assert new.text == generator.generate([chat("Write a proposal.", "expert-3")])[0].text
    assert [k for k in runtime._generator.adapters if k.startswith("writer__")] == [
        runtime._keys["writer"]
    ]


async def test_an_unloaded_adapter_fails_its_running_requests_only(
    runtime: LorafleetRuntime, generator: Generator
) -> None:
    # Given a writer request and a base request decoding side by side
    hold = Hold(lambda: runtime.batcher.batch_sizes.get(2, 0) >= 2)
    runtime.batcher.after_each_step(hold)
    writer = asyncio.ensure_future(runtime.generate(chat("Write a long proposal.", "writer", 30)))
    base_request = chat("Write a long proposal.", None, 30)
    base = asyncio.ensure_future(runtime.generate(base_request))
    await hold.reached()
    # When the writer is unloaded between two steps
    unload = asyncio.ensure_future(runtime.unload_adapter("writer"))
    await asyncio.sleep(0.1)  # queued for the worker
    hold.release()
    await unload
    # Then the writer request fails with one line, and the base request is answered
    with pytest.raises(LorafleetError, match="adapter 'writer' was unloaded"):
        await writer
    assert await base == generator.generate([base_request])[0]
    assert runtime._generator.adapters == {}


async def test_a_request_past_its_deadline_leaves_the_batch(runtime: LorafleetRuntime) -> None:
    with pytest.raises(TimeoutError):
        await runtime.batcher.submit(chat("Write a long proposal.", "writer", 400), None, 0.05)
    for _ in range(100):
        if not runtime.batcher.engine.busy:
            break
        await asyncio.sleep(0.01)
    assert not runtime.batcher.engine.busy


async def test_a_request_that_left_the_queue_frees_its_place(
    tiny_base: Path, fleet_adapters: dict[str, Path]
) -> None:
    # Given one request decoding (the batch is full at one) and a full queue of two
    runtime = build_runtime(
        tiny_base, {"writer": fleet_adapters["expert-2"]}, max_batch_size=1, max_queue=2
    )
    try:
        deltas: list[str] = []
        running = asyncio.ensure_future(
            runtime.generate(chat("Write a long proposal.", None, 60), deltas.append)
        )
        while not deltas:
            await asyncio.sleep(0.01)
        queued = [runtime.batcher.enqueue(chat(f"Request {i}.", "writer")) for i in range(2)]
        with pytest.raises(Overloaded):
            runtime.batcher.enqueue(chat("One more."))
        # When the queued callers go away
        for future in queued:
            future.cancel()
        # Then their places are free at the next step, while the first still decodes
        for _ in range(100):
            if runtime.batcher.queue_depth == 0:
                break
            await asyncio.sleep(0.01)
        assert runtime.batcher.queue_depth == 0 and not running.done()
        assert (await runtime.generate(chat("One more.", "writer"))).completion_tokens > 0
        await running
    finally:
        runtime.batcher.close()
