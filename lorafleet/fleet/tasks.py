"""The tasks an expert can be trained for (one check shared by the spec and the records)."""

from __future__ import annotations

__all__ = ["TASKS", "check_task"]


# Tasks with dedicated metrics and synthesis rules; "chat" is any other conversational expert.
TASKS = (
    "proposal-writer",
    "job-analyzer",
    "profile-reviewer",
    "candidate-evaluator",
    "job-post-writer",
    "chat",
)


def check_task(v: str) -> str:
    """A pydantic field check: ``v`` must be one of :data:`TASKS`."""
    if v not in TASKS:
        raise ValueError(f"unknown task {v!r}; known: {', '.join(TASKS)}")
    return v
