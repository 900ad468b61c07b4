"""run_isolated: a batch whose call raises is split until the exception reaches only its rows.

A fake batch runner stands in for the generator: each row's text is its prompt reversed,
streamed one character at a time, and a batch raises after streaming when it holds a
``bad`` row (as a device error in a batch's last step would).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from lorafleet.engine.generation import GenerationRequest, GenerationResult
from lorafleet.serve.batching import RetryDiverged, run_isolated


class FakeBatches:
    """A batch runner that records each call's prompts; ``answer`` maps a prompt to its text."""

    def __init__(self, answer: Callable[[str], str] = lambda p: p[::-1]) -> None:
        self.answer = answer
        self.calls: list[list[str]] = []

    def __call__(
        self,
        requests: Sequence[GenerationRequest],
        on_delta: Callable[[int, str], None],
        is_cancelled: Callable[[int], bool],
    ) -> list[GenerationResult]:
        self.calls.append([r.prompt for r in requests])
        texts = [self.answer(r.prompt) for r in requests]
        for i, text in enumerate(texts):
            for char in text:
                on_delta(i, char)
        if any(r.prompt.startswith("bad") for r in requests):
            raise RuntimeError("device-side assert")
        return [GenerationResult(t, [0] * len(t), 1, "stop") for t in texts]


def _requests(prompts: list[str]) -> list[GenerationRequest]:
    return [GenerationRequest(prompt=p) for p in prompts]


def test_one_bad_row_fails_alone_and_mates_stream_their_text_once() -> None:
    # Given a batch of eight with one bad row
    prompts = [f"row-{i}" for i in range(8)]
    prompts[5] = "bad-5"
    runner, streamed = FakeBatches(), {}

    def on_delta(i: int, text: str) -> None:
        streamed[i] = streamed.get(i, "") + text

    # When it runs
    results = dict(run_isolated(runner, _requests(prompts), range(8), on_delta, lambda i: False))
    # Then only the bad row gets the exception, every other row its result, streamed once
    assert sorted(results) == list(range(8))
    assert isinstance(results[5], RuntimeError)
    assert {i: r.text for i, r in results.items() if i != 5} == {
        i: p[::-1] for i, p in enumerate(prompts) if i != 5
    }
    assert streamed == {i: p[::-1] for i, p in enumerate(prompts)}
    # in halves, only the failing ones split again: 2 log2(8) + 1 calls in all
    assert [len(c) for c in runner.calls] == [8, 4, 4, 2, 1, 1, 2]


def test_a_retry_that_does_not_repeat_the_streamed_text_is_an_error_of_its_own() -> None:
    # Given a runner whose answers change from one call to the next (not greedy)
    calls = iter(range(100))
    runner = FakeBatches(answer=lambda p: p if p.startswith("bad") else f"{next(calls)}-{p}")
    streamed: dict[int, str] = {}

    def on_delta(i: int, text: str) -> None:
        streamed[i] = streamed.get(i, "") + text

    # When its batch fails and the good row runs again alone
    results = dict(
        run_isolated(runner, _requests(["bad", "good"]), [0, 1], on_delta, lambda i: False)
    )
    # Then the good row, having streamed a text its retry does not repeat, gets RetryDiverged,
    # and its client never got text from the second run
    assert isinstance(results[1], RetryDiverged)
    assert streamed[1] == "0-good"


def test_rows_whose_caller_left_are_not_run_again() -> None:
    runner = FakeBatches()
    gone = {1}
    results = run_isolated(
        runner, _requests(["bad", "left", "stays"]), [0, 1, 2], lambda i, t: None, gone.__contains__
    )
    assert [i for i, _ in results] == [0, 2]
    assert all("left" not in call for call in runner.calls)


@pytest.mark.parametrize("size", [1, 5])
def test_a_batch_that_always_fails_gives_each_row_the_error(size: int) -> None:
    runner = FakeBatches()
    results = run_isolated(
        runner,
        _requests([f"bad-{i}" for i in range(size)]),
        range(size),
        lambda i, t: None,
        lambda i: False,
    )
    assert [i for i, _ in results] == list(range(size))
    assert all(isinstance(r, RuntimeError) for _, r in results)
    assert len(runner.calls) == 2 * size - 1
