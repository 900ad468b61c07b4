"""A task, declared: what an expert's answers look like and how they are judged.

A task definition is data (a YAML file, or a mapping under the spec's ``tasks:``): its
answer format, its metrics from the metric library (:mod:`lorafleet.tasks.metrics`), its
primary metric, what the teacher and the judges are told, its safety cases and its
generation budget. The work-marketplace tasks ship as definitions too
(:mod:`lorafleet.tasks.catalog`); an expert whose task the spec does not declare gets the
shipped one of that name.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from functools import cache
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from lorafleet.errors import LorafleetError
from lorafleet.fleet.common import SLUG, StrictModel
from lorafleet.tasks import catalog
from lorafleet.tasks.metrics import Scorer, build_scorer, token_f1
from lorafleet.tasks.safety import RULES

__all__ = [
    "AnswerSpec",
    "MetricUse",
    "SafetyCaseSpec",
    "TaskDefinition",
    "TaskGeneration",
    "TaskJudge",
    "TaskSafety",
    "TaskSynthesis",
    "check_task",
    "known_task",
    "resolve_task",
    "shipped_task",
    "unknown_task_message",
]

METRIC_NAME = r"^[a-z][a-z0-9_]{0,62}$"
_SCORERS: dict[str, dict[str, Scorer]] = {}  # by definition digest
ALWAYS = "token_f1"  # reported for every task


def _schema_problem(schema: dict) -> str | None:
    """Why ``schema`` is not a JSON Schema, or None."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(map(str, exc.path))
        return f"not a valid JSON Schema{f' at {where}' if where else ''}: {exc.message}"
    return None


class AnswerSpec(StrictModel):
    """The shape of the expert's final answer."""

    format: Literal["text", "json"] = Field("text", description="free text, or one JSON value")
    json_schema: dict[str, Any] | None = Field(
        None,
        alias="schema",
        description="JSON Schema the answer must match (format json); checked on the data and "
        "by the schema_valid metric",
    )

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("json_schema")
    @classmethod
    def _compiles(cls, v: dict | None) -> dict | None:
        if v is not None and (problem := _schema_problem(v)):
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _json_only(self) -> AnswerSpec:
        if self.json_schema is not None and self.format != "json":
            raise ValueError("schema is for format: json")
        return self


class MetricUse(StrictModel):
    """One metric of the task: a library metric, its parameters, the name it is reported as."""

    metric: str = Field(description="a built-in metric or one a package offers (lorafleet.metrics)")
    name: str | None = Field(None, pattern=METRIC_NAME, description="reported as (default: metric)")
    params: dict[str, Any] = Field(default_factory=dict)
    direction: Literal["higher", "lower"] = Field(
        "higher", description="which way is better (the gate's regression rule follows it)"
    )

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, data: Any) -> Any:
        return {"metric": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _builds(self) -> MetricUse:
        # The task's schema is checked by the task; any valid schema stands in for it here.
        build_scorer(self.metric, self.params, {"type": "object"})
        return self

    @property
    def reported(self) -> str:
        """The name its score is reported under."""
        return self.name or self.metric


class TaskSynthesis(StrictModel):
    """What the teacher is told (``synthesis.generator: teacher``)."""

    teacher_prompt: str | None = Field(
        None, description="the task's instructions to the teacher; the reply format is added"
    )
    judge_rubric: str | None = Field(
        None, description="how the synthesis judge grades a generated record from 1 to 5"
    )


class TaskJudge(StrictModel):
    """What the gate's pairwise judge is told."""

    rubric: str | None = Field(
        None, description="what makes one answer better; the verdict format is added"
    )


class SafetyCaseSpec(StrictModel):
    """One adversarial prompt and the rules its answer must pass."""

    id: str = Field(pattern=SLUG)
    kind: str = "custom"
    prompt: str = Field(min_length=1)
    rules: list[str] = Field(min_length=1, description=f"from: {', '.join(RULES)}")

    @field_validator("rules")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [r for r in v if r not in RULES]
        if unknown:
            raise ValueError(f"unknown safety rule {unknown[0]!r}; known: {', '.join(RULES)}")
        return v


class TaskSafety(StrictModel):
    """The safety cases the expert is tested on (``safety_pass_rate``)."""

    include: list[str] = Field(
        default_factory=list, description="shipped case sets, e.g. marketplace"
    )
    cases: list[SafetyCaseSpec] = Field(default_factory=list, description="the task's own cases")

    @field_validator("include")
    @classmethod
    def _sets(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in catalog.case_sets():
                raise ValueError(
                    f"unknown safety case set {name!r}; shipped: {', '.join(catalog.case_sets())}"
                )
        return v

    def resolved(self) -> list[SafetyCaseSpec]:
        """Every case: the included sets', then the task's own."""
        shipped = [
            SafetyCaseSpec.model_validate(c)
            for name in self.include
            for c in catalog.case_set(name)
        ]
        return [*shipped, *self.cases]


class TaskGeneration(StrictModel):
    """How the expert generates when it is evaluated."""

    max_new_tokens: int = Field(96, ge=1, description="answer budget for task metrics")


class TaskDefinition(StrictModel):
    """A task an expert can be trained for."""

    name: str = Field(pattern=SLUG)
    description: str = ""
    answer: AnswerSpec = Field(default_factory=AnswerSpec)
    metrics: list[MetricUse] = Field(
        default_factory=list, description=f"from the metric library; {ALWAYS} is always reported"
    )
    primary_metric: str | None = Field(
        None, description="the metric summaries lead with (default: the first)"
    )
    reference_checks: list[str] = Field(
        default_factory=list,
        description="metrics every record's reference answer must score 1 on (data validation)",
    )
    synthesis: TaskSynthesis = Field(default_factory=TaskSynthesis)
    judge: TaskJudge = Field(default_factory=TaskJudge)
    safety: TaskSafety = Field(default_factory=TaskSafety)
    generation: TaskGeneration = Field(default_factory=TaskGeneration)

    @model_validator(mode="after")
    def _consistent(self) -> TaskDefinition:
        names = [m.reported for m in self.metrics]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"metric names must be unique; repeated: {', '.join(dupes)}")
        known = [*names, *([] if ALWAYS in names else [ALWAYS])]
        if self.primary_metric is not None and self.primary_metric not in known:
            raise ValueError(
                f"primary_metric {self.primary_metric!r} is not one of the task's metrics: "
                f"{', '.join(known)}"
            )
        for check in self.reference_checks:
            if check not in known:
                raise ValueError(
                    f"reference_checks: {check!r} is not one of the task's metrics: {', '.join(known)}"
                )
        for i, m in enumerate(self.metrics):
            if m.metric == "schema_valid" and self.answer.json_schema is None:
                raise ValueError(f"metrics.{i}: schema_valid needs answer.schema")
        return self

    @property
    def primary(self) -> str:
        """The metric summaries lead with."""
        return self.primary_metric or (self.metrics[0].reported if self.metrics else ALWAYS)

    def direction(self, metric: str) -> str:
        """``higher`` or ``lower``: which way ``metric`` is better."""
        return next((m.direction for m in self.metrics if m.reported == metric), "higher")

    def scorers(self) -> dict[str, Scorer]:
        """Every metric's scorer by reported name, ``token_f1`` first (built once per
        definition: kept by digest, outside the model, so equal definitions stay equal)."""
        digest = self.digest()
        if digest not in _SCORERS:
            schema = self.answer.json_schema
            _SCORERS[digest] = {ALWAYS: token_f1} | {
                m.reported: build_scorer(m.metric, m.params, schema) for m in self.metrics
            }
        return _SCORERS[digest]

    def digest(self) -> str:
        """SHA-256 of the definition: in lineage, and in the cache key of every step using it."""
        text = self.model_dump_json(by_alias=True, exclude_none=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def safety_cases(self) -> list[SafetyCaseSpec]:
        """The safety cases, shipped sets expanded."""
        return self.safety.resolved()


def check_task(v: str) -> str:
    """A pydantic field check: a task's name is a DNS-1123 label."""
    if not isinstance(v, str) or not re.match(SLUG, v):
        raise ValueError(f"task {v!r} must be a lower-case name like 'contract-summarizer'")
    return v


def known_task(name: str) -> bool:
    """Whether a task of that name ships with lorafleet."""
    return name in catalog.shipped_tasks()


@cache
def shipped_task(name: str) -> TaskDefinition:
    """The shipped definition called ``name``.

    Raises:
        KeyError: No shipped task has that name.
    """
    return TaskDefinition.model_validate(catalog.shipped_task(name))


def resolve_task(task: TaskDefinition | str) -> TaskDefinition:
    """A definition as it is, a name as the shipped task of that name.

    Raises:
        LorafleetError: No shipped task has that name.
    """
    if isinstance(task, TaskDefinition):
        return task
    try:
        return shipped_task(task)
    except KeyError:
        raise LorafleetError(unknown_task_message(task)) from None


def unknown_task_message(name: str, declared: Mapping[str, object] | None = None) -> str:
    """One line for a task nobody declared."""
    declared_names = sorted(declared or {})
    where = f"declared: {', '.join(declared_names)}; " if declared_names else ""
    return f"unknown task {name!r}; {where}shipped: {', '.join(catalog.shipped_tasks())}"
