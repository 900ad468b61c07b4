"""Task metrics of generated answers: the task definition's metrics, averaged over the eval set.

What each metric means is the metric library's (:mod:`lorafleet.tasks.metrics`); which
metrics a task has is its definition's (:class:`lorafleet.fleet.TaskDefinition`).
"""

from __future__ import annotations

from collections.abc import Sequence

from lorafleet.fleet.tasks import TaskDefinition, resolve_task
from lorafleet.records import Record
from lorafleet.tasks.metrics import Example

__all__ = ["score", "task_metrics"]


def score(task: TaskDefinition | str, prediction: str, record: Record) -> dict[str, float]:
    """Every metric of one prediction (a task name means the shipped task)."""
    ex = Example.of(record.messages)
    return {name: s(prediction, ex) for name, s in resolve_task(task).scorers().items()}


def task_metrics(
    task: TaskDefinition | str, predictions: Sequence[str], records: Sequence[Record]
) -> dict[str, float]:
    """Mean of every metric over the eval set."""
    rows = [score(task, p, r) for p, r in zip(predictions, records, strict=True)]
    return {k: round(sum(row[k] for row in rows) / len(rows), 4) for k in rows[0]} if rows else {}
