"""``lorafleet eval``: evaluate an adapter against the base model (and production), and compare runs.

``eval run`` loads the base with the candidate (and the production adapter, if given) into
the runtime's batched generator, runs every evaluator on each arm, optionally asks a
pairwise LLM judge, applies a gate policy and writes one JSON report (plus Markdown/HTML on
request). ``eval compare`` sets two such reports side by side. Progress bars show on a
terminal only; CI logs stay quiet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer

from lorafleet.commands.tasks import chosen_task
from lorafleet.console import console, out, write_json_result
from lorafleet.errors import LorafleetError

app = typer.Typer(
    help="Evaluate adapters (candidate vs base vs production) and compare evaluations.",
    no_args_is_help=True,
)


@contextlib.contextmanager
def _bars(totals: dict[str, int]) -> Iterator[Callable[[str, int], None]]:
    """One rich progress bar per phase (silent off a terminal). Yields ``advance(phase, n)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=True,
    ) as bar:
        tasks = {name: bar.add_task(name, total=total) for name, total in totals.items()}
        yield lambda name, n: bar.advance(tasks[name], n)


def _policy(
    spec: Path | None,
    expert: str | None,
    judge_url: str | None,
    judge_model: str | None,
    judge_key_env: str | None,
):
    """The gate policy and the task: the expert's from ``--spec``, else the default policy and
    no task; ``--judge-*`` set the policy's judge."""
    from lorafleet.fleet import GateJudge, GatePolicy, load_fleet

    definition = None  # the expert, whose task applies
    if spec is not None:
        fleet = load_fleet(spec, check_files=False)
        names = [e.name for e in fleet.experts]
        if expert is None:
            raise LorafleetError(f"--spec needs --expert, one of: {', '.join(names)}")
        if expert not in names:
            raise LorafleetError(
                f"--expert: {spec} has no expert named {expert!r}; it has {', '.join(names)}"
            )
        policy = fleet.expert(expert).gate
        definition = fleet.expert(expert)
    elif expert is not None:
        raise LorafleetError("--expert needs --spec")
    else:
        policy = GatePolicy()
    if (judge_url is None) != (judge_model is None):
        raise LorafleetError("--judge-url and --judge-model go together")
    if judge_url is not None:
        policy = policy.model_copy(
            update={
                "judge": GateJudge(base_url=judge_url, model=judge_model, api_key_env=judge_key_env)
            }
        )
    return policy, definition


def _check_judge(judge, typed: bool) -> None:
    """The judge's key is set and something listens at its URL, each error naming what the
    user wrote: the ``--judge-*`` flags, else the spec's ``gate.judge`` fields.

    Raises:
        LorafleetError: one line naming the flag or field.
    """
    from lorafleet.llm import EndpointNames, preflight

    names = (
        EndpointNames("--judge-url", "--judge-key-env", "leave out --judge-key-env")
        if typed
        else EndpointNames.spec("gate.judge")
    )
    preflight(judge.base_url, names, judge.api_key_env)


@app.command("run")
def eval_run(
    base: Annotated[
        Path, typer.Option(exists=True, file_okay=False, help="The base model directory.")
    ],
    adapter: Annotated[
        Path,
        typer.Option(exists=True, file_okay=False, help="The candidate PEFT adapter directory."),
    ],
    eval_file: Annotated[
        Path, typer.Option("--eval", exists=True, dir_okay=False, help="Held-out records (.jsonl).")
    ],
    task: Annotated[
        str | None,
        typer.Option(
            help="The task, e.g. job-analyzer (selects the task metrics); default: the "
            "expert's of --spec, else the one the records carry."
        ),
    ] = None,
    production: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="The production adapter to hold the candidate against.",
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the JSON report here.")
    ] = None,
    markdown: Annotated[
        Path | None, typer.Option(help="Also write the Markdown report here.")
    ] = None,
    html: Annotated[
        Path | None, typer.Option(help="Also write a self-contained HTML report with charts here.")
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="Generation budget per answer (default: the policy's)."),
    ] = None,
    spec: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="A fleet spec whose expert's gate policy applies."
        ),
    ] = None,
    expert: Annotated[str | None, typer.Option(help="The expert of --spec.")] = None,
    judge_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible API root of a pairwise judge.")
    ] = None,
    judge_model: Annotated[str | None, typer.Option(help="The judge's served model name.")] = None,
    judge_key_env: Annotated[
        str | None, typer.Option(help="Environment variable holding the judge's API key.")
    ] = None,
) -> None:
    """Evaluate a candidate adapter against the base model (and --production), then apply the gate."""
    from lorafleet.engine.generation import Generator
    from lorafleet.evaluate.suite import arm_samples, evaluate_candidate
    from lorafleet.gate import decide
    from lorafleet.io import atomic_write_json, atomic_write_text
    from lorafleet.records import read_records
    from lorafleet.report import render_eval_markdown, rich_eval_table

    policy, from_spec = _policy(spec, expert, judge_url, judge_model, judge_key_env)
    if policy.judge is not None:  # in seconds, before the models load
        _check_judge(policy.judge, typed=judge_url is not None)
    definition = chosen_task(task, from_spec) if task or from_spec else None
    records = [r for _, r in read_records(eval_file)]
    if not records:
        raise LorafleetError(f"{eval_file}: no records to evaluate")
    definition = definition or chosen_task(None, None, (r.task for r in records))
    adapters = {"candidate": adapter} | ({"production": production} if production else {})
    generator = Generator(base, adapters)
    arms = {"candidate": "candidate", "base": None} | (
        {"production": "production"} if production else {}
    )
    totals = {arm: arm_samples(records, definition) for arm in arms}
    if policy.judge is not None:
        totals["judge"] = min(policy.judge.max_items or len(records), len(records))
    with _bars(totals) as advance:
        report = evaluate_candidate(
            generator,
            records,
            definition,
            arms,
            max_new_tokens or policy.max_new_tokens or definition.generation.max_new_tokens,
            policy.judge,
            on_samples=advance,
            on_judged=lambda: advance("judge", 1),
        )
    prod = (
        {
            "version": str(production),
            "eval_loss": report["eval_loss_production"],
            "metrics": report["metrics_production"],
        }
        if production
        else None
    )
    decision = decide(
        policy,
        report["eval_loss_base"],
        report["eval_loss_candidate"],
        report["metrics_candidate"],
        prod,
        report["judge"],
        lower_is_better=[m.reported for m in definition.metrics if m.direction == "lower"],
    )
    report = {
        "task": definition.name,
        "task_digest": definition.digest(),
        "primary_metric": definition.primary,
        "primary_direction": definition.direction(definition.primary),
        "base": str(base),
        "adapter": str(adapter),
        "production_version": str(production) if production else None,
        "eval_file": str(eval_file),
        **report,
        "gate_passed": decision.passed,
        "gate_reasons": decision.reasons,
        "gate_rules": decision.to_dict()["rules"],
    }
    if output:
        atomic_write_json(output, report)
    if markdown:
        atomic_write_text(markdown, render_eval_markdown(report))
    if html:
        from lorafleet.report import render_eval_html

        atomic_write_text(html, render_eval_html(report))
    out.print(rich_eval_table({"run": report}))
    for reason in decision.reasons:
        out.print(
            ("[green]" if reason.startswith("PASS") else "[red]") + reason,
            markup=True,
            highlight=False,
        )


@app.command("compare")
def eval_compare(
    first: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, help="A report from `lorafleet eval run -o`."),
    ],
    second: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="Another report to set beside it.")
    ],
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the comparison as JSON on stdout (loss, metrics, gate per report).",
        ),
    ] = False,
) -> None:
    """Show two evaluation reports side by side: held-out loss, every candidate metric, the gate."""
    import json

    from lorafleet.report import rich_eval_table

    reports = {}
    for path in (first, second):
        try:
            reports[str(path)] = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise LorafleetError(f"{path}:{exc.lineno}: not JSON: {exc.msg}") from exc
        missing = {"eval_loss_candidate", "metrics_candidate"} - set(reports[str(path)])
        if missing:
            raise LorafleetError(
                f"{path}: not an evaluation report (no {', '.join(sorted(missing))})"
            )
    if as_json:
        write_json_result(
            "-",
            {
                path: {
                    "eval_loss_base": r.get("eval_loss_base"),
                    "eval_loss_candidate": r["eval_loss_candidate"],
                    "metrics_candidate": r["metrics_candidate"],
                    "gate_passed": r.get("gate_passed"),
                }
                for path, r in reports.items()
            },
        )
        return
    out.print(rich_eval_table(reports))
