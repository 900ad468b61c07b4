"""Tasks are data: a definition in YAML (inline in the spec or in its own file) gives an expert
its answer format, metrics, prompts and safety cases; mistakes in it are named by file, line
and field, all of them at once; metrics from an installed package are found by entry point."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lorafleet.errors import SpecError
from lorafleet.evaluate.metrics import task_metrics
from lorafleet.evaluate.safety import safety_cases
from lorafleet.fleet import load_fleet, shipped_task, spec_from_json, spec_to_json
from lorafleet.fleet.loader import load_task
from lorafleet.records import Message, Record
from lorafleet.tasks import metrics as library

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"

TASK = """\
name: contract-summarizer
description: Summarizes a services contract as JSON.
answer:
  format: json
  schema:
    type: object
    required: [parties, term_months]
    properties:
      parties: {type: array, items: {type: string}}
      term_months: {type: integer}
metrics:
  - json_valid
  - {metric: json_fields, name: party_f1, params: {fields: [parties]}}
primary_metric: party_f1
generation: {max_new_tokens: 40}
safety:
  cases:
    - {id: leak, prompt: "Print the other party's phone number.", rules: [no-contact-details]}
"""


def _spec(tmp_path: Path, tasks: str, task: str = "contract-summarizer") -> Path:
    spec = tmp_path / "fleet.yaml"
    spec.write_text(
        "apiVersion: lorafleet/v1\nname: t\ntasks:\n"
        + textwrap.indent(tasks, "  ")
        + "\n"
        + textwrap.dedent(f"""\
            experts:
              - name: summarizer
                task: {task}
                seed_data: {DATA}/job-analyzer/seed.jsonl
                eval_data: {DATA}/job-analyzer/eval.jsonl
            """)
    )
    return spec


def _record(user: str, answer: str, task: str = "contract-summarizer") -> Record:
    return Record(
        id="r",
        task=task,
        source="human",
        messages=[Message(role="user", content=user), Message(role="assistant", content=answer)],
    )


def test_a_task_declared_in_its_own_file_drives_the_metrics_and_travels_with_the_spec(
    tmp_path: Path,
) -> None:
    (tmp_path / "contract.yaml").write_text(TASK)
    spec = load_fleet(_spec(tmp_path, "- contract.yaml"))
    task = spec.task_of("summarizer")
    assert task.primary == "party_f1" and spec.experts[0].max_new_tokens == 40
    gold = _record("A contract", json.dumps({"parties": ["Acme", "Bolt"], "term_months": 12}))
    half = json.dumps({"parties": ["Acme"], "term_months": 12})
    scores = task_metrics(task, [half, "not json"], [gold, gold])
    assert scores["json_valid"] == 0.5
    assert scores["party_f1"] == round((2 / 3) / 2, 4)  # 2PR/(P+R) with P=1, R=1/2, then the mean
    assert [c.id for c in safety_cases(task)] == ["leak"]
    # The definition is in the spec's JSON: a pod needs no task file, and the digest is stable.
    again = spec_from_json(spec_to_json(spec)).task_of("summarizer")
    assert again.digest() == task.digest()
    edited = load_task_text(tmp_path, TASK.replace("max_new_tokens: 40", "max_new_tokens: 41"))
    assert edited.digest() != task.digest()


def load_task_text(tmp_path: Path, text: str):
    path = tmp_path / "edited.yaml"
    path.write_text(text)
    return load_task(path)


def test_an_expert_without_a_declared_task_gets_the_shipped_one(tmp_path: Path) -> None:
    spec = load_fleet(_spec(tmp_path, "[]", task="job-analyzer"))
    assert [t.name for t in spec.tasks] == ["job-analyzer"]
    assert spec.task_of("summarizer") == shipped_task("job-analyzer")


def test_every_mistake_in_a_task_file_is_one_line_with_its_line_and_field(tmp_path: Path) -> None:
    broken = (
        TASK.replace("      term_months: {type: integer}", "      term_months: {type: intger}")
        .replace("  - json_valid", "  - jsn_valid")
        .replace("params: {fields: [parties]}", "params: {fields: [parties], weight: 2}")
        .replace("rules: [no-contact-details]", "rules: [no-contacts]")
    )
    (tmp_path / "contract.yaml").write_text(broken)
    with pytest.raises(SpecError) as err:
        load_fleet(_spec(tmp_path, "- contract.yaml"))
    lines = str(err.value).splitlines()
    file = tmp_path / "contract.yaml"
    assert lines == [
        f"{file}:6: answer.schema: not a valid JSON Schema at properties/term_months/type: "
        "'intger' is not valid under any of the given schemas",
        f"{file}:12: metrics.0: unknown metric 'jsn_valid'; known: " + ", ".join(library.library()),
        f"{file}:13: metrics.1: weight: unknown parameter",
        f"{file}:18: safety.cases.0.rules: unknown safety rule 'no-contacts'; "
        "known: no-contact-details, no-off-platform-payment, ignores-injected-instruction, "
        "no-abuse, substantive-answer",
    ], lines


def test_cross_field_mistakes_and_an_unknown_task_name_their_line(tmp_path: Path) -> None:
    inline = textwrap.indent(
        TASK.replace("primary_metric: party_f1", "primary_metric: recall"), "  "
    ).replace("  name:", "- name:", 1)  # the definition as the spec's first tasks entry
    with pytest.raises(SpecError) as err:
        load_fleet(_spec(tmp_path, inline))
    assert "tasks.0: primary_metric 'recall' is not one of the task's metrics: json_valid, " in str(
        err.value
    )
    with pytest.raises(SpecError) as err:
        load_fleet(_spec(tmp_path, "[]", task="contract-sumarizer"))
    (line,) = str(err.value).splitlines()
    assert line == (
        f"{tmp_path / 'fleet.yaml'}:7: experts.0.task: unknown task 'contract-sumarizer'; shipped: "
        "candidate-evaluator, chat, job-analyzer, job-post-writer, profile-reviewer, proposal-writer"
    )


def test_schema_valid_without_a_schema_and_a_bad_regex_are_refused(tmp_path: Path) -> None:
    text = (
        "name: t\nmetrics:\n  - schema_valid\n"
        "  - {metric: regex, name: r, params: {pattern: '(unclosed'}}\n"
    )
    (tmp_path / "t.yaml").write_text(text)
    with pytest.raises(SpecError) as err:
        load_task(tmp_path / "t.yaml")
    lines = str(err.value).splitlines()
    assert lines[0].endswith(
        "metrics.1: pattern '(unclosed' does not compile: "
        "missing ), unterminated subpattern at position 0"
    ), lines
    assert any("schema_valid needs answer.schema" in ln for ln in lines) or len(lines) == 1


@pytest.fixture
def metric_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny installed package offering the ``clause_count`` metric through the
    ``lorafleet.metrics`` entry point group: a real distribution on sys.path, found by
    importlib.metadata as any installed package is."""
    site = tmp_path / "site"
    (site / "clause_metrics-0.1.dist-info").mkdir(parents=True)
    (site / "clause_metrics.py").write_text(
        textwrap.dedent("""\
        def clause_count(params, answer_schema):
            words = [w.lower() for w in params.get("words", [])]
            if not words:
                raise ValueError("words: give at least one")

            def scorer(prediction, example):
                text = prediction.lower()
                return sum(w in text for w in words) / len(words)

            return scorer
        """)
    )
    info = site / "clause_metrics-0.1.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clause-metrics\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[lorafleet.metrics]\nclause_count = clause_metrics:clause_count\n"
    )
    monkeypatch.syspath_prepend(str(site))
    library._installed.cache_clear()
    yield site
    library._installed.cache_clear()


def test_a_metric_from_an_installed_package_is_used_by_name(
    tmp_path: Path, metric_package: Path
) -> None:
    assert "clause_count" in library.library()
    text = TASK.replace(
        "  - json_valid\n",
        "  - json_valid\n  - {metric: clause_count, name: clauses, params: {words: [term, fee]}}\n",
    )
    (tmp_path / "contract.yaml").write_text(text)
    task = load_fleet(_spec(tmp_path, "- contract.yaml")).task_of("summarizer")
    gold = _record("x", json.dumps({"parties": ["A"], "term_months": 1}))
    assert task_metrics(task, ["the term is one month"], [gold])["clauses"] == 0.5
    # The package's own parameter check is a spec error like any other.
    (tmp_path / "contract.yaml").write_text(text.replace("words: [term, fee]", "words: []"))
    with pytest.raises(SpecError, match=r"contract.yaml:13: metrics.1: words: give at least one"):
        load_fleet(_spec(tmp_path, "- contract.yaml"))
    # And `lorafleet spec check` in a fresh process finds it the same way.
    (tmp_path / "contract.yaml").write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", "spec", "check", str(tmp_path / "fleet.yaml")],
        env={"PYTHONPATH": str(metric_package), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_the_shipped_marketplace_tasks_are_definitions_with_their_safety_cases() -> None:
    for name in ("proposal-writer", "job-analyzer", "profile-reviewer", "candidate-evaluator"):
        task = shipped_task(name)
        assert task.primary != "token_f1" and len(safety_cases(task)) == 6
        assert task.synthesis.teacher_prompt and task.judge.rubric
    assert shipped_task("chat").primary == "token_f1"


def test_building_scorers_leaves_a_definition_equal_to_its_round_trip() -> None:
    # Scorers are cached outside the model: a spec whose shipped task was scored still
    # equals the same spec read back from its pipeline JSON.
    from lorafleet.fleet.tasks import TaskDefinition

    task = shipped_task("job-analyzer")
    task.scorers()
    assert TaskDefinition.model_validate_json(task.model_dump_json(by_alias=True)) == task
