"""Validate an expert's records with great-expectations suites.

The reader (:mod:`lorafleet.records`) enforces syntax and the schema line by line. The
suites check the rules across records as real GX validations (an ephemeral context, a
pandas data asset, one validation definition per file):

- the common suite: unique ids, the expert's task, role order, non-empty content,
  length bounds, personal data (critical under ``pii: reject``, a warning under ``scrub``),
  and warnings for repeated conversations and differing system prompts;
- the task's suite, from its definition: a JSON answer parses and matches the task's answer
  schema; every reference answer scores 1 on the task's ``reference_checks`` metrics
  (a ranking that names every candidate of the question exactly once, say).

Critical failures fail the file; warnings are reported and counted. Each finding on a
record is reported as ``FILE:LINE: rule: detail``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from lorafleet.errors import DataError
from lorafleet.fleet import DataRules, TaskDefinition
from lorafleet.fleet.tasks import resolve_task
from lorafleet.records import Record, read_records
from lorafleet.tasks.metrics import Example

__all__ = [
    "Check",
    "Failure",
    "ValidationReport",
    "frame",
    "run_suite",
    "suite_for",
    "validate_file",
    "validate_records",
]

log = logging.getLogger(__name__)

Severity = Literal["critical", "warning"]
ROLE_PATTERN = r"^(?:system,)?(?:user,assistant,)*user,assistant$"


@dataclass(frozen=True)
class Failure:
    """One record that broke one rule."""

    line: int
    rule: str
    detail: str


@dataclass(frozen=True)
class Check:
    """One expectation of a suite, with the rule name it reports under."""

    rule: str
    detail: str
    column: str | None  # the value shown in a finding's detail; None for table-level checks
    expectation: Any
    severity: Severity = "critical"


@dataclass
class ValidationReport:
    """What the suites found in one file (or one batch of records)."""

    file: str
    task: str
    rows: int
    expectations: list[dict] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    warnings: list[Failure] = field(default_factory=list)
    pii: dict[str, int] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        """No critical expectation failed (warnings do not count)."""
        return not self.failures and all(
            e["success"] for e in self.expectations if e["severity"] == "critical"
        )

    def lines(self) -> list[str]:
        """Critical failures as ``FILE:LINE: rule: detail`` lines, in file order."""
        return [str(DataError(self.file, f.line, f.rule, f.detail)) for f in self.failures]

    def warning_lines(self) -> list[str]:
        """Warnings as ``FILE:LINE: rule: detail`` lines (``FILE: rule: detail`` for table-level ones)."""
        return [str(DataError(self.file, f.line or None, f.rule, f.detail)) for f in self.warnings]

    def raise_for_failures(self) -> None:
        """Raise the first critical failure as a :class:`DataError`."""
        if self.failures:
            f = self.failures[0]
            more = f" (and {len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
            raise DataError(self.file, f.line, f.rule, f.detail + more)

    def to_dict(self) -> dict:
        """The structured result (JSON-able)."""
        return {
            "file": self.file,
            "task": self.task,
            "rows": self.rows,
            "success": self.success,
            "expectations": self.expectations,
            "failures": [asdict(f) for f in self.failures],
            "warnings": [asdict(f) for f in self.warnings],
            "pii": self.pii,
        }


def _answer(r: Record) -> str:
    return next((m.content for m in reversed(r.messages) if m.role == "assistant"), "")


def _json_or_none(text: str) -> str | None:
    try:
        json.loads(text)
    except ValueError:
        return None
    return text


def _schema_problems(answers: list[str | None], schema: dict) -> list[str | None]:
    """The first JSON-schema violation of each parseable answer (``None``: fine or not JSON).

    GX's own ``ExpectColumnValuesToMatchJsonSchema`` re-checks the schema for every row
    (about 3 ms a row); a validator compiled once with ``fastjsonschema`` takes a few
    microseconds, and GX then expects the column of problems to be null.
    """
    import fastjsonschema

    validate = fastjsonschema.compile(schema)
    out: list[str | None] = []
    for text in answers:
        problem = None
        if text is not None:
            try:
                validate(json.loads(text))
            except fastjsonschema.JsonSchemaValueException as exc:
                problem = "answer" + exc.message.removeprefix("data")
        out.append(problem)
    return out


def frame(
    records: list[tuple[int, Record]],
    task: TaskDefinition | str,
    pii: list[Counter[str]] | None = None,
):
    """The pandas frame the suites run on: one row per record, one column per measured fact.

    Args:
        records: ``(line, record)`` pairs.
        task: the expert's task definition (adds its columns); a name means the shipped task.
        pii: each record's personal-data findings, if already counted.
    """
    import pandas as pd

    from lorafleet.data.curate import conversation_key
    from lorafleet.data.pii import record_pii

    def system(r: Record) -> str:
        return r.messages[0].content if r.messages[0].role == "system" else ""

    rows = [r for _, r in records]
    columns: dict[str, list] = {
        "line": [ln for ln, _ in records],
        "id": [r.id for r in rows],
        "task": [r.task for r in rows],
        "roles": [",".join(m.role for m in r.messages) for r in rows],
        "min_chars": [min(len(m.content.strip()) for m in r.messages) for r in rows],
        "max_chars": [max(len(m.content) for m in r.messages) for r in rows],
        "total_chars": [sum(len(m.content) for m in r.messages) for r in rows],
        "pii": [",".join(sorted(c)) for c in (pii if pii is not None else map(record_pii, rows))],
        "content_key": [conversation_key(r) for r in rows],
        "system": [system(r) for r in rows],
    }
    definition = resolve_task(task)
    if definition.answer.format == "json":
        columns["answer"] = [_answer(r) for r in rows]
        columns["answer_json"] = [_json_or_none(a) for a in columns["answer"]]
        if definition.answer.json_schema is not None:
            columns["answer_schema"] = _schema_problems(
                columns["answer_json"], definition.answer.json_schema
            )
    scorers = definition.scorers()
    for name in definition.reference_checks:
        columns[f"reference_{name}"] = [
            float(scorers[name](_answer(r), Example.of(r.messages))) for r in rows
        ]
    return pd.DataFrame(columns)


def suite_for(task: TaskDefinition | str, rules: DataRules) -> list[Check]:
    """Every check of the expert's suite: the common rules, then the task's own."""
    import great_expectations as gx

    expect = gx.expectations
    definition = resolve_task(task)
    task = definition.name
    checks = [
        Check(
            "duplicate-id",
            "id is used by more than one record",
            "id",
            expect.ExpectColumnValuesToBeUnique(column="id"),
        ),
        Check(
            "wrong-task",
            f"task must be {task!r}",
            "task",
            expect.ExpectColumnValuesToBeInSet(column="task", value_set=[task]),
        ),
        Check(
            "role-order",
            "turns must be [system] then user/assistant alternating, ending with assistant",
            "roles",
            expect.ExpectColumnValuesToMatchRegex(column="roles", regex=ROLE_PATTERN),
        ),
        Check(
            "empty-content",
            "a message has empty or whitespace-only content",
            "min_chars",
            expect.ExpectColumnValuesToBeBetween(column="min_chars", min_value=1),
        ),
        Check(
            "content-too-long",
            f"a message is longer than {rules.max_chars} characters",
            "max_chars",
            expect.ExpectColumnValuesToBeBetween(column="max_chars", max_value=rules.max_chars),
        ),
        Check(
            "conversation-too-long",
            f"the conversation is longer than {rules.max_total_chars} characters",
            "total_chars",
            expect.ExpectColumnValuesToBeBetween(
                column="total_chars", max_value=rules.max_total_chars
            ),
        ),
        Check(
            "duplicate-content",
            "the same conversation (up to case and whitespace) appears under another id",
            "id",
            expect.ExpectColumnValuesToBeUnique(column="content_key"),
            "warning",
        ),
        Check(
            "system-prompt-varies",
            "records use more than one system prompt",
            None,
            expect.ExpectColumnUniqueValueCountToBeBetween(column="system", max_value=1),
            "warning",
        ),
    ]
    if (
        rules.min_chars > 1
    ):  # with 1 it is empty-content's expectation, which GX would merge into one
        checks.insert(
            4,
            Check(
                "content-too-short",
                f"a message is shorter than {rules.min_chars} characters",
                "min_chars",
                expect.ExpectColumnValuesToBeBetween(column="min_chars", min_value=rules.min_chars),
            ),
        )
    if rules.pii != "off":
        severity: Severity = "critical" if rules.pii == "reject" else "warning"
        checks.append(
            Check(
                "pii",
                "personal data or an off-platform request",
                "pii",
                expect.ExpectColumnValuesToBeInSet(column="pii", value_set=[""]),
                severity,
            )
        )
    if definition.answer.format == "json":
        checks.append(
            Check(
                "answer-not-json",
                "the final answer is not valid JSON",
                "answer",
                expect.ExpectColumnValuesToBeJsonParseable(column="answer"),
            )
        )
    if definition.answer.json_schema is not None:
        checks.append(
            Check(
                "answer-schema",
                f"the final answer does not match the {task} JSON schema",
                "answer_schema",
                expect.ExpectColumnValuesToBeNull(column="answer_schema"),
            )
        )
    checks += [
        Check(
            f"reference-{name}",
            f"the reference answer must score 1 on the task's {name} metric",
            "answer" if definition.answer.format == "json" else None,
            expect.ExpectColumnValuesToBeInSet(column=f"reference_{name}", value_set=[1.0]),
        )
        for name in definition.reference_checks
    ]
    return checks


def _observed(value: object) -> str:
    """What a whole-file expectation measured, as a person reads it: ``3``, not
    ``np.int64(3)``; a list or mapping as its items, strings without quotes."""
    if type(value).__module__ == "numpy":  # a numpy scalar or array: its Python value
        value = value.tolist() if hasattr(value, "tolist") else value.item()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_observed(v)}" for k, v in value.items()) or "nothing"
    if isinstance(value, list | tuple):
        return ", ".join(_observed(v) for v in value) or "nothing"
    return "nothing" if value is None else str(value)


def _value(row: dict, column: str | None) -> str:
    """`` (got VALUE)`` for a finding: the offending cell as the user wrote it, not as the
    dataframe holds it (``0``, not ``np.int64(0)``; ``nothing`` for a missing value)."""
    if not column:
        return ""
    value = row.get(column)
    if type(value).__module__ == "numpy":  # a numpy scalar: its Python value
        value = value.item()
    missing = value is None or (isinstance(value, float) and value != value)  # None or NaN
    text = "nothing" if missing else repr(value)
    return f" (got {text[:120]}{'...' if len(text) > 120 else ''})"


def run_suite(
    records: list[tuple[int, Record]], task: TaskDefinition | str, rules: DataRules, name: str
) -> ValidationReport:
    """Run the expert's suite as a GX validation definition over ``(line, record)`` pairs.

    Args:
        records: records with the line (or row) numbers findings should name.
        task: the expert's task definition (a name means the shipped task).
        rules: length bounds and the PII policy.
        name: what the report is about (a file path, usually).

    Returns:
        The report; ``report.success`` is False on any critical failure.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    from lorafleet.data.pii import record_pii

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = (
        ctx.data_sources.add_pandas("lorafleet")
        .add_dataframe_asset("records")
        .add_batch_definition_whole_dataframe("all")
    )
    task = resolve_task(task)
    checks = {c.rule: c for c in suite_for(task, rules)}
    suite = ctx.suites.add(gx.ExpectationSuite(name=f"{task.name}-records"))
    for c in checks.values():
        c.expectation.meta = {"rule": c.rule}
        c.expectation.severity = c.severity
        suite.add_expectation(c.expectation)
    vd = ctx.validation_definitions.add(
        gx.ValidationDefinition(name=f"{task.name}-validation", data=batch_def, suite=suite)
    )
    pii_per_record = [record_pii(r) for _, r in records]
    result = vd.run(
        batch_parameters={"dataframe": frame(records, task, pii_per_record)},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["line"]},
    )
    pii: Counter[str] = Counter()
    for counts in pii_per_record:
        pii.update(counts)
    report = ValidationReport(
        file=str(name), task=task.name, rows=len(records), pii=dict(sorted(pii.items()))
    )
    critical: list[Failure] = []
    warnings: list[Failure] = []
    for er in sorted(
        result.results, key=lambda er: list(checks).index(er.expectation_config.meta["rule"])
    ):
        check = checks[er.expectation_config.meta["rule"]]
        bad = er.result.get("unexpected_index_list") or []
        observed = er.result.get("observed_value")
        report.expectations.append(
            {
                "rule": check.rule,
                "severity": check.severity,
                "expectation": er.expectation_config.type,
                "success": bool(er.success),
                "unexpected_count": len(bad),
                **({"observed_value": observed} if observed is not None else {}),
            }
        )
        into = critical if check.severity == "critical" else warnings
        if bad:
            into += [
                Failure(int(row["line"]), check.rule, check.detail + _value(row, check.column))
                for row in bad
            ]
        elif not er.success:
            into.append(Failure(0, check.rule, f"{check.detail} (found {_observed(observed)})"))
    # Two expectations can flag one line (empty content is also too short): keep the first.
    seen: set[int] = set()
    order = {rule: i for i, rule in enumerate(checks)}
    for f in sorted(critical, key=lambda f: (f.line, order[f.rule])):
        if f.line not in seen:
            seen.add(f.line)
            report.failures.append(f)
    report.warnings = sorted(warnings, key=lambda f: (f.line, f.rule))
    log.info(
        "validated %s: %d records, %d failures, %d warnings",
        name,
        len(records),
        len(report.failures),
        len(warnings),
    )
    return report


def validate_records(
    records: list[Record],
    task: TaskDefinition | str,
    rules: DataRules | None = None,
    name: str = "records",
) -> ValidationReport:
    """Run the suite over in-memory records; findings name the row (1-based) as the line."""
    return run_suite(list(enumerate(records, start=1)), task, rules or DataRules(), name)


def validate_file(
    path: str | Path, task: TaskDefinition | str, rules: DataRules | None = None
) -> ValidationReport:
    """Read ``path`` and run the expert's great-expectations suite on it.

    Args:
        path: a ``.jsonl`` (or ``.jsonl.gz``) file of records.
        task: the expert's task definition (a name means the shipped task); every record
            must carry its name.
        rules: length bounds, the line size limit and the PII policy.

    Returns:
        The report; check ``report.success``.

    Raises:
        DataError: if the file cannot be read as records at all (syntax, schema, empty).
    """
    rules = rules or DataRules()
    records = read_records(path, rules.max_line_bytes)
    if not records:
        raise DataError(path, None, "empty-file", "no records")
    return run_suite(records, task, rules, str(path))
