"""Validate an expert's records with a great-expectations suite.

The reader (:mod:`lorafleet.records`) enforces syntax and the schema; this suite checks
the rules across records: unique ids, the expert's task, role order, non-empty content
and length bounds. Each failure is reported as ``FILE:LINE: rule: detail``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorafleet.errors import DataError
from lorafleet.fleet import DataRules
from lorafleet.records import Record, read_records

__all__ = ["Failure", "ValidationReport", "validate_file"]

log = logging.getLogger(__name__)

ROLE_PATTERN = r"^(?:system,)?(?:user,assistant,)*user,assistant$"


@dataclass(frozen=True)
class Failure:
    """One record that broke one rule."""

    line: int
    rule: str
    detail: str


@dataclass
class ValidationReport:
    """What the suite found in one file."""

    file: str
    task: str
    rows: int
    expectations: list[dict] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return not self.failures

    def lines(self) -> list[str]:
        """Failures as ``FILE:LINE: rule: detail`` lines, in file order."""
        return [str(DataError(self.file, f.line, f.rule, f.detail)) for f in self.failures]

    def raise_for_failures(self) -> None:
        """Raise the first failure as a :class:`DataError`."""
        if self.failures:
            f = self.failures[0]
            more = f" (and {len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
            raise DataError(self.file, f.line, f.rule, f.detail + more)

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "task": self.task,
            "rows": self.rows,
            "success": self.success,
            "expectations": self.expectations,
            "failures": [asdict(f) for f in self.failures],
        }

    def to_markdown(self) -> str:
        head = f"### Validation of `{Path(self.file).name}` ({self.task}): {'PASSED' if self.success else 'FAILED'}\n\n"
        rows = "\n".join(
            f"| {e['rule']} | {'ok' if e['success'] else 'FAILED'} | {e['unexpected_count']} |" for e in self.expectations
        )
        return head + f"{self.rows} records.\n\n| rule | result | bad rows |\n|---|---|---|\n{rows}\n"


def _frame(records: list[tuple[int, Record]]):
    import pandas as pd

    def stripped(r: Record) -> list[int]:
        return [len(m.content.strip()) for m in r.messages]

    return pd.DataFrame(
        {
            "line": [ln for ln, _ in records],
            "id": [r.id for _, r in records],
            "task": [r.task for _, r in records],
            "roles": [",".join(m.role for m in r.messages) for _, r in records],
            "min_chars": [min(stripped(r)) for _, r in records],
            "max_chars": [max(len(m.content) for m in r.messages) for _, r in records],
            "total_chars": [sum(len(m.content) for m in r.messages) for _, r in records],
        }
    )


def _suite(task: str, rules: DataRules):
    """``(rule, detail, column, expectation)`` for every check of the suite."""
    import great_expectations as gx

    x = gx.expectations
    return [
        ("duplicate-id", "id is used by more than one record", "id", x.ExpectColumnValuesToBeUnique(column="id")),
        ("wrong-task", f"task must be {task!r}", "task", x.ExpectColumnValuesToBeInSet(column="task", value_set=[task])),
        (
            "role-order",
            "turns must be [system] then user/assistant alternating, ending with assistant",
            "roles",
            x.ExpectColumnValuesToMatchRegex(column="roles", regex=ROLE_PATTERN),
        ),
        ("empty-content", "a message has empty or whitespace-only content", "min_chars",
         x.ExpectColumnValuesToBeBetween(column="min_chars", min_value=1)),
        ("content-too-short", f"a message is shorter than {rules.min_chars} characters", "min_chars",
         x.ExpectColumnValuesToBeBetween(column="min_chars", min_value=rules.min_chars)),
        ("content-too-long", f"a message is longer than {rules.max_chars} characters", "max_chars",
         x.ExpectColumnValuesToBeBetween(column="max_chars", max_value=rules.max_chars)),
        ("conversation-too-long", f"the conversation is longer than {rules.max_total_chars} characters",
         "total_chars", x.ExpectColumnValuesToBeBetween(column="total_chars", max_value=rules.max_total_chars)),
    ]


def validate_file(path: str | Path, task: str, rules: DataRules | None = None) -> ValidationReport:
    """Read ``path`` and run the expert's great-expectations suite on it.

    Args:
        path: a ``.jsonl`` (or ``.jsonl.gz``) file of records.
        task: the expert's task; every record must carry it.
        rules: length bounds.

    Returns:
        The report; check ``report.success``.

    Raises:
        DataError: if the file cannot be read as records at all (syntax, schema, empty).
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    rules = rules or DataRules()
    records = read_records(path)
    if not records:
        raise DataError(path, None, "empty-file", "no records")
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = ctx.data_sources.add_pandas("lorafleet").add_dataframe_asset("records")
    batch_def = batch.add_batch_definition_whole_dataframe("file")
    checks = _suite(task, rules)
    suite = ctx.suites.add(gx.ExpectationSuite(name=f"{task}-records"))
    for rule, _, _, exp in checks:
        exp.meta = {"rule": rule}
        suite.add_expectation(exp)
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{task}-validation", data=batch_def, suite=suite))
    result = vd.run(
        batch_parameters={"dataframe": _frame(records)},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["line"]},
    )
    by_rule = {rule: (detail, column) for rule, detail, column, _ in checks}
    report = ValidationReport(file=str(path), task=task, rows=len(records))
    failures: list[Failure] = []
    for er in result.results:
        rule = er.expectation_config.meta["rule"]
        bad = er.result.get("unexpected_index_list") or []
        report.expectations.append({"rule": rule, "success": bool(er.success), "unexpected_count": len(bad)})
        detail, column = by_rule[rule]
        for row in bad:
            failures.append(Failure(int(row["line"]), rule, f"{detail} (got {row[column]!r})"))
    # Two expectations can flag one line (empty content is also too short): keep the first.
    seen: set[int] = set()
    for f in sorted(failures, key=lambda f: f.line):
        if f.line not in seen:
            seen.add(f.line)
            report.failures.append(f)
    log.info("validated %s: %d records, %d failures", path, len(records), len(report.failures))
    return report
