"""The publish step's smoke test: one chat completion per adapter, through the project's
OpenAI client, against the real runtime and a scripted server (the ``openai_stub`` fixture)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.llm import RetryPolicy
from lorafleet.publish import ask_each_adapter

HI = [{"role": "user", "content": "Write a title for a data engineering job."}]
FAST = RetryPolicy(max_retries=2, backoff_s=0.01)


@pytest.mark.integration
def test_every_served_adapter_answers_and_an_unknown_one_is_recorded(
    tiny_base: Path, tiny_adapters: dict[str, Path]
) -> None:
    from lorafleet.serve.runtime import run_server_subprocess

    with run_server_subprocess(tiny_base, {"job-analyzer": tiny_adapters["job-analyzer"]}) as url:
        replies = ask_each_adapter(url, {"job-analyzer": HI, "no-such-adapter": HI}, max_tokens=4)
    served, unknown = replies["job-analyzer"], replies["no-such-adapter"]
    assert served["status"] == 200 and served["model"] == "job-analyzer"
    assert isinstance(served["text"], str) and served["latency_s"] > 0
    assert unknown["status"] == 404 and unknown["model"] is None
    assert unknown["text"].startswith("HTTP 404")


def test_a_busy_server_is_retried_and_a_malformed_answer_is_not_served(openai_stub) -> None:
    openai_stub.script = [
        (503, {"error": {"message": "loading"}}, {"retry-after": "0"}),
        (200, openai_stub.completion("hello", "writer"), {}),
        (200, {"choices": []}, {}),
    ]
    replies = ask_each_adapter(openai_stub.root, {"writer": HI, "broken": HI}, retry=FAST)
    assert [r["path"] for r in openai_stub.requests] == ["/openai/v1/chat/completions"] * 3
    assert {k: (v["status"], v["model"], v["text"]) for k, v in replies.items()} == {
        "writer": (200, "writer", "hello"),
        "broken": (0, None, "malformed answer: no choices"),
    }
