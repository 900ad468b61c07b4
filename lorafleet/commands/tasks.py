"""Which task a command works on: ``--task``, the expert's of ``--spec``, or the records'."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from lorafleet.errors import LorafleetError

if TYPE_CHECKING:
    from lorafleet.fleet import ExpertSpec, TaskDefinition

__all__ = ["chosen_task"]


def chosen_task(
    option: str | None, expert: ExpertSpec | None, carried: Iterable[str] = ()
) -> TaskDefinition:
    """The task: ``--task`` (a shipped task's name), else the expert's (its spec's definition),
    else the first record's (records with another task then fail validation line by line).

    Args:
        option: what ``--task`` says, if given.
        expert: the ``--spec``/``--expert`` expert, if given.
        carried: the records' task names, in file order (only the first is read).

    Raises:
        LorafleetError: an unknown task, a ``--task`` that contradicts the expert's, records
            with no or several tasks; one line naming the flag.
    """
    from lorafleet.fleet.tasks import resolve_task

    if option is not None and expert is not None and option != expert.task:
        raise LorafleetError(f"--task: {option!r}, but the expert's task is {expert.task!r}")
    if expert is not None:
        return expert.task_definition
    name = option if option is not None else next(iter(carried), None)
    if name is None:
        raise LorafleetError("--task: no records to take it from; pass --task or --spec")
    try:
        return resolve_task(name)
    except LorafleetError as error:
        how = "" if option is not None else " (the records' task; pass --spec to declare it)"
        raise LorafleetError(f"--task: {error}{how}") from None
