"""The pairwise judge: verdict parsing, position-bias cancelling, ties, the seeded bootstrap,
the whole path against the project's own OpenAI-compatible server, and its client's key and
retry rules against a scripted one (the ``openai_stub`` fixture)."""

from __future__ import annotations

import re

import pytest

from lorafleet.errors import LorafleetError
from lorafleet.evaluate.judge import (
    JudgeClient,
    aggregate,
    bootstrap_ci,
    judge_pairwise,
    judge_prompt,
    parse_verdict,
)
from lorafleet.llm import RetryPolicy

FAST = RetryPolicy(max_retries=1, backoff_s=0.01)


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("A is specific and on task.\n[[A]]", "A"),
        (
            "first looked fine [[B]] but on reflection [[tie]]",
            "tie",
        ),  # the last bracketed verdict counts
        ("Verdict: b", "B"),
        ("**Winner:** A", "A"),
        (" tie. ", "tie"),
        ("B", "B"),
        ("Both are about the same, hard to say.", "unparseable"),
        ("Answer A and answer B", "unparseable"),
        ("", "unparseable"),
    ],
)
def test_parse_verdict(reply: str, verdict: str) -> None:
    assert parse_verdict(reply) == verdict


def test_a_judge_that_always_picks_position_a_cancels_out() -> None:
    # The candidate is A in the first order and B in the second: one win and one loss per item.
    result = aggregate([("A", "A")] * 10)
    assert result["win_rate"] == 0.5
    assert result["outcomes"] == {"win": 10, "loss": 10, "tie": 0, "unparseable": 0}
    assert result["position_consistency"] == 0.0 and result["parse_rate"] == 1.0


def test_consistent_wins_ties_and_unparseable_verdicts() -> None:
    # 6 items won in both orders, 2 tied, 2 with gibberish in both orders (not scored).
    verdicts = [("A", "B")] * 6 + [("tie", "tie")] * 2 + [("unparseable", "unparseable")] * 2
    result = aggregate(verdicts, resamples=2000, seed=3)
    assert (result["items"], result["scored_items"]) == (10, 8)
    assert result["win_rate"] == pytest.approx((6 + 0.5 * 2) / 8)
    assert result["outcomes"] == {"win": 12, "loss": 0, "tie": 4, "unparseable": 4}
    assert result["parse_rate"] == pytest.approx(16 / 20)
    assert result["position_consistency"] == 0.8  # gibberish pairs do not count as agreeing
    assert result["ci_low"] <= result["win_rate"] <= result["ci_high"]
    assert 0.5 < result["ci_low"] < result["ci_high"] <= 1.0


def test_a_judge_that_only_writes_gibberish_gives_no_win_rate() -> None:
    # Scoring gibberish as ties held the win rate at 0.5: a lower bound of 0.5 then passed.
    result = aggregate([("unparseable", "unparseable")] * 12)
    assert result["win_rate"] is None and result["ci_low"] is None
    assert result["parse_rate"] == 0.0 and result["outcomes"]["unparseable"] == 24


def test_one_unparseable_order_leaves_the_other_orders_score() -> None:
    result = aggregate([("A", "unparseable"), ("unparseable", "A")])
    # the first item won as A; the second lost as B (the judge picked A, the reference)
    assert result["win_rate"] == 0.5 and result["scored_items"] == 2
    assert result["parse_rate"] == 0.5


def test_bootstrap_is_seeded_and_narrows_with_more_items() -> None:
    scores = [1.0, 0.0, 0.5, 1.0, 1.0, 0.5, 0.0, 1.0]
    assert bootstrap_ci(scores, seed=7) == bootstrap_ci(scores, seed=7)
    # With few resamples the seed shows in the interval.
    assert bootstrap_ci(scores, resamples=100, seed=7) != bootstrap_ci(
        scores, resamples=100, seed=8
    )
    low, high = bootstrap_ci(scores)
    low_many, high_many = bootstrap_ci(scores * 20)
    assert high_many - low_many < high - low
    assert bootstrap_ci([1.0] * 5) == (1.0, 1.0)


def test_judge_pairwise_asks_both_orders() -> None:
    asked: list[str] = []

    def judge(messages) -> str:
        # A judge that prefers the longer answer wherever it is shown.
        text = messages[-1]["content"]
        asked.append(text)
        a = text.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
        b = text.split("Answer B:\n")[1].split("\n\nVerdict?")[0]
        return "[[A]]" if len(a) > len(b) else "[[B]]"

    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    result = judge_pairwise(
        judge,
        prompts,
        ["a long answer"] * 3 + ["x"],
        ["short"] * 3 + ["much longer"],
        resamples=200,
    )
    assert len(asked) == 8
    assert "Answer A:\na long answer" in asked[0] and "Answer B:\na long answer" in asked[1]
    assert result["win_rate"] == 0.75
    assert result["outcomes"] == {"win": 6, "loss": 2, "tie": 0, "unparseable": 0}
    assert result["examples"][0]["verdicts"] == ["A", "B"]


def test_judge_prompt_shows_the_request_and_both_answers() -> None:
    chat = judge_prompt([{"role": "user", "content": "Analyze this job"}], "first", "second")
    assert chat[0]["role"] == "system" and "[[TIE]]" in chat[0]["content"]
    assert "Analyze this job" in chat[1]["content"] and chat[1]["content"].index("first") < chat[1][
        "content"
    ].index("second")


@pytest.mark.integration
def test_judge_through_the_projects_own_openai_server(tiny_base) -> None:
    """The tiny base judges through the runtime's /openai/v1: its replies are gibberish,
    so its verdicts are unparseable and score nothing, and the gate refuses a judge whose
    verdicts mostly do not parse."""
    from lorafleet.evaluate.judge import SCORE
    from lorafleet.fleet import GateJudge, GatePolicy
    from lorafleet.gate import decide
    from lorafleet.serve.runtime import run_server_subprocess

    prompts = [[{"role": "user", "content": f"Write a title for job {i}."}] for i in range(3)]
    with run_server_subprocess(tiny_base, {}) as url:
        client = JudgeClient(url + "/openai/v1", "base", max_tokens=8)
        result = judge_pairwise(
            client.complete, prompts, ["Data engineer"] * 3, ["A job"] * 3, resamples=200
        )
    outcomes = result["outcomes"]
    assert sum(outcomes.values()) == 6
    assert all(isinstance(e["candidate_as_a"], str) for e in result["examples"])
    assert outcomes["unparseable"] >= 1  # a 300-token toy model does not write [[A]]
    parsed = {k: v for k, v in outcomes.items() if k in SCORE}
    assert result["parse_rate"] == pytest.approx(sum(parsed.values()) / 6)
    policy = GatePolicy(
        max_loss_ratio=2.0,
        judge=GateJudge(base_url=url, model="base", min_win_rate_lower_bound=0.5),
    )
    decision = decide(policy, 2.0, 1.0, {}, judge={**result, "reference": "production"})
    parse_rule = next(r for r in decision.rules if r.rule == "judge-parse-rate")
    assert parse_rule.passed == (result["parse_rate"] >= 0.9)
    assert not decision.passed  # at least one of 6 verdicts did not parse: 5/6 < 0.9


def test_judge_client_reports_an_unreachable_endpoint() -> None:
    with pytest.raises(
        LorafleetError,
        match=re.escape("judge: http://127.0.0.1:9/v1/chat/completions model 'm': gave up after 2"),
    ):
        JudgeClient("http://127.0.0.1:9/v1", "m", timeout=2, retry=FAST).complete(
            [{"role": "user", "content": "hi"}]
        )


def test_judge_client_needs_its_key_before_any_request(openai_stub, monkeypatch) -> None:
    monkeypatch.delenv("LORAFLEET_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(LorafleetError) as caught:
        JudgeClient(openai_stub.url, "m", api_key_env="LORAFLEET_TEST_JUDGE_KEY")
    assert str(caught.value).startswith(
        "gate.judge.api_key_env: environment variable LORAFLEET_TEST_JUDGE_KEY is not set"
    )
    assert openai_stub.requests == []
    monkeypatch.setenv("LORAFLEET_TEST_JUDGE_KEY", "judge-key")
    JudgeClient(openai_stub.url, "m", api_key_env="LORAFLEET_TEST_JUDGE_KEY").complete([])
    assert openai_stub.requests[0]["authorization"] == "Bearer judge-key"


def test_one_429_does_not_fail_the_judge(openai_stub) -> None:
    # Given a judge endpoint that rate-limits the first request
    openai_stub.script = [(429, {"error": {"message": "rate limited"}}, {"retry-after": "0"})]
    # When the gate asks it for a verdict, then it is asked again and its verdict counts
    reply = JudgeClient(openai_stub.url, "judge", retry=FAST).complete(
        judge_prompt([{"role": "user", "content": "q"}], "a", "b")
    )
    assert parse_verdict(reply) == "A"
    assert len(openai_stub.requests) == 2
    assert openai_stub.requests[1]["body"]["temperature"] == 0


def test_a_malformed_judge_answer_is_one_line(openai_stub) -> None:
    openai_stub.script = [(200, {"choices": []}, {})]
    with pytest.raises(LorafleetError, match="model 'judge': malformed answer: no choices"):
        JudgeClient(openai_stub.url, "judge", retry=FAST).complete([])
