"""``lorafleet data``: validate, synthesize, curate and describe data files.

Settings come from an expert of a fleet spec (``--spec FILE --expert NAME``) or, for
one-off use, from the command's own options. Every user mistake is one line
``FILE:LINE: rule: detail`` on stderr and exit code 2, and no output file is written.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from lorafleet.commands.tasks import chosen_task
from lorafleet.console import console, out, write_json_result
from lorafleet.errors import LorafleetError, first_problem, validation_problems

app = typer.Typer(
    help="Validate, synthesize, curate and describe data files (JSONL records).",
    no_args_is_help=True,
)

SpecOpt = Annotated[
    Path | None, typer.Option("--spec", help="A fleet spec; its expert's data settings are used.")
]
ExpertOpt = Annotated[
    str | None, typer.Option("--expert", help="The expert of --spec whose settings apply.")
]


def _expert(spec: Path | None, expert: str | None):
    """The named expert of a spec, or ``None`` when no spec is given."""
    if spec is None:
        if expert is not None:
            raise LorafleetError("--expert needs --spec")
        return None
    from lorafleet.fleet import load_fleet

    fleet = load_fleet(spec, check_files=False)
    names = [e.name for e in fleet.experts]
    if expert is None and len(names) == 1:
        return fleet.experts[0]
    if expert is None:
        raise LorafleetError(f"--spec needs --expert, one of: {', '.join(names)}")
    if expert not in names:
        raise LorafleetError(
            f"--expert: {spec} has no expert named {expert!r}; it has {', '.join(names)}"
        )
    return fleet.expert(expert)


# Each command's options, by the settings field they set: its messages name the flag typed.
_RULES_FLAGS = {"min_chars": "--min-chars", "max_chars": "--max-chars", "pii": "--pii"}
_SYNTHESIS_FLAGS = {
    "generator": "--generator",
    "per_seed": "--per-seed",
    "seed": "--seed",
    "teacher.base_url": "--teacher-url",
    "teacher.model": "--teacher-model",
    "teacher.api_key_env": "--api-key-env",
    "teacher.api_key_file": "--api-key-file",
    "teacher.concurrency": "--concurrency",
    "judge.model": "--judge-model",
    "judge.min_score": "--min-score",
}
_CURATION_FLAGS = {
    "near_dup_threshold": "--near-dup-threshold",
    "pii": "--pii",
    "max_synthetic_ratio": "--max-synthetic-ratio",
}


def _option_problem(
    exc: ValidationError, flags: dict[str, str], typed: dict[str, object], root: str
) -> str:
    """The first problem of settings built from options over a ``--spec`` expert's, in the
    words the user typed: ``--pii: Input should be ...``, ``--teacher-model is required with
    --teacher-url``, ``--min-chars 9000 must not exceed --max-chars``. A problem with a
    value the spec gave keeps the field's name.

    Args:
        exc: the validation error of the settings.
        flags: field path -> the option that sets it.
        typed: field path -> value, for each option the user gave.
        root: names a rule across fields that no option was given for.
    """
    error = exc.errors()[0]
    path = ".".join(map(str, error["loc"]))
    message = validation_problems(exc)[0][1]
    if path in flags and error["type"] == "missing":
        block = path.rpartition(".")[0]
        given = [flags[p] for p in typed if p in flags and p.rpartition(".")[0] == block]
        return f"{flags[path]} is required" + (f" with {' '.join(given)}" if given else "")
    if path in flags and path in typed:
        return f"{flags[path]}: {message}"
    if not path and any(p in flags for p in typed):
        for field, flag in flags.items():
            named = f"{flag} {typed[field]}" if field in typed else flag
            message = re.sub(rf"\b{re.escape(field)}\b", named, message)
        return message
    return first_problem(exc, root)


@contextlib.contextmanager
def _progress(description: str, total: int | None) -> Iterator:
    """A rich progress bar on a terminal; silent in CI logs and pipes. Yields ``advance()``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


@app.command("validate")
def data_validate(
    file: Annotated[Path, typer.Argument(help="A .jsonl or .jsonl.gz file of records.")],
    task: Annotated[
        str | None,
        typer.Option(
            help="The task every record must carry (default: the expert's of --spec, else "
            "the one the records carry)."
        ),
    ] = None,
    spec: SpecOpt = None,
    expert: ExpertOpt = None,
    min_chars: Annotated[
        int | None, typer.Option(help="Shortest allowed message (default: the spec's, else 1).")
    ] = None,
    max_chars: Annotated[
        int | None, typer.Option(help="Longest allowed message (default: the spec's, else 8000).")
    ] = None,
    pii: Annotated[
        str | None,
        typer.Option(
            help="Personal data policy: scrub, reject or off (default: the spec's, else scrub)."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write a clean copy here (PII scrubbed under 'scrub'), only if the file passes."
        ),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(
            help="Write validation.json, validation.html and validation.md into this folder."
        ),
    ] = None,
) -> None:
    """Run the great-expectations suite on one data file.

    Every critical failure is printed as FILE:LINE: rule: detail (exit code 2, nothing written to --out); warnings are printed too but do not fail the file.
    """
    from lorafleet.data.validate import validate_file
    from lorafleet.fleet import DataRules
    from lorafleet.records import iter_records

    chosen = _expert(spec, expert)
    carried = (r.task for _, r in iter_records(file)) if task is None and chosen is None else ()
    definition = chosen_task(task, chosen, carried)
    overrides = {
        k: v
        for k, v in {"min_chars": min_chars, "max_chars": max_chars, "pii": pii}.items()
        if v is not None
    }
    try:
        rules = DataRules.model_validate(
            {**(chosen.data.model_dump() if chosen else {}), **overrides}
        )
    except ValidationError as exc:
        problem = _option_problem(exc, _RULES_FLAGS, overrides, "data rules")
        raise LorafleetError(f"invalid option: {problem}") from None
    with (
        console.status(f"validating {file}", spinner="dots")
        if console.is_terminal
        else contextlib.nullcontext()
    ):
        result = validate_file(file, definition, rules)
    if report is not None:
        from lorafleet.data.report import validation_html, validation_markdown
        from lorafleet.io import atomic_write_json, atomic_write_text

        atomic_write_json(report / "validation.json", result.to_dict())
        atomic_write_text(report / "validation.html", validation_html([result]))
        atomic_write_text(report / "validation.md", validation_markdown([result]))
    for line in result.lines():
        typer.echo(line, err=True)
    for line in result.warning_lines():
        typer.echo(f"warning: {line}", err=True)
    if not result.success:
        raise typer.Exit(2)
    if out is not None:
        from lorafleet.data.pii import scrub_record
        from lorafleet.records import dump_records, iter_records

        records = (r for _, r in iter_records(file, rules.max_line_bytes))
        dump_records(
            out, (scrub_record(r)[0] for r in records) if rules.pii == "scrub" else records
        )
    pii_note = ", ".join(f"{k} {v}" for k, v in result.pii.items())
    console.print(
        f"{file}: ok — {result.rows} records pass {len(result.expectations)} expectations"
        + (f"; {len(result.warnings)} warnings" if result.warnings else "")
        + (f"; personal data: {pii_note}" if pii_note else "")
    )


@app.command("synthesize")
def data_synthesize(
    seeds: Annotated[
        Path, typer.Argument(help="The seed records to expand (.jsonl or .jsonl.gz).")
    ],
    out: Annotated[Path, typer.Option(help="Where the synthetic records go (JSONL).")],
    spec: SpecOpt = None,
    expert: ExpertOpt = None,
    task: Annotated[
        str | None,
        typer.Option(help="The task (default: the expert's of --spec, else the seeds' first)."),
    ] = None,
    generator: Annotated[
        str | None,
        typer.Option(help="programmatic or teacher (default: the spec's, else programmatic)."),
    ] = None,
    per_seed: Annotated[int | None, typer.Option(help="New records per seed.")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Synthesis seed (deterministic output for a seed).")
    ] = None,
    teacher_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible API root, e.g. http://host/openai/v1.")
    ] = None,
    teacher_model: Annotated[
        str | None, typer.Option(help="The teacher's served model name.")
    ] = None,
    api_key_env: Annotated[
        str | None,
        typer.Option(
            help="Environment variable holding the API key; it must be set. '' for a server that needs no key."
        ),
    ] = None,
    api_key_file: Annotated[
        Path | None, typer.Option(help="File holding the API key (a mounted Kubernetes secret).")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Teacher requests in flight at once.")
    ] = None,
    judge_model: Annotated[
        str | None, typer.Option(help="Score each record with this judge model; drop low scores.")
    ] = None,
    min_score: Annotated[int | None, typer.Option(help="Lowest judge score (1-5) kept.")] = None,
    work_dir: Annotated[
        Path | None,
        typer.Option(help="The teacher's resumable shards (default: OUT.work). Rerun to resume."),
    ] = None,
    shard: Annotated[
        str,
        typer.Option(
            help="Expand only shard I of N of the seeds (I/N, 1-based); merge with `data curate --synthetic` repeated."
        ),
    ] = "1/1",
) -> None:
    """Expand seed records with the programmatic generator or a teacher LLM.

    A teacher run is resumable: kill it and run the same command again, and it goes on from the finished jobs in --work-dir; the result equals an uninterrupted run's.
    """
    from lorafleet.data.shard import split_records
    from lorafleet.data.synth import synthesize
    from lorafleet.fleet import SynthesisSettings
    from lorafleet.records import dump_records, read_records

    index, sep, count = shard.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise LorafleetError(f"--shard {shard!r}: expected I/N with 1 <= I <= N, e.g. 2/8")
    chosen = _expert(spec, expert)
    pool_records = [r for _, r in read_records(seeds)]
    records = split_records(pool_records, int(count))[int(index) - 1]
    definition = chosen_task(task, chosen, (r.task for r in pool_records))
    settings = chosen.synthesis.model_dump() if chosen else {}
    flat = {"generator": generator, "per_seed": per_seed, "seed": seed}
    settings.update({k: v for k, v in flat.items() if v is not None})
    teacher = {
        "base_url": teacher_url,
        "model": teacher_model,
        "api_key_env": api_key_env,
        "api_key_file": api_key_file,
        "concurrency": concurrency,
    }
    if any(v is not None for v in teacher.values()):
        settings["teacher"] = {
            **(settings.get("teacher") or {}),
            **{k: v for k, v in teacher.items() if v is not None},
        }
    if judge_model is not None or min_score is not None:
        judge = {"model": judge_model, "min_score": min_score}
        settings["judge"] = {
            **(settings.get("judge") or {}),
            **{k: v for k, v in judge.items() if v is not None},
        }
    try:
        synthesis = SynthesisSettings.model_validate(settings)
    except ValidationError as exc:
        given = {**flat, **{f"teacher.{k}": v for k, v in teacher.items()}}
        given |= {"judge.model": judge_model, "judge.min_score": min_score}
        typed = {path: value for path, value in given.items() if value is not None}
        # A spec that loaded has its teacher: these options asked for one they do not give.
        asked = ["--generator teacher"] if typed.get("generator") == "teacher" else []
        asked += [_SYNTHESIS_FLAGS[p] for p in ("judge.model", "judge.min_score") if p in typed]
        if not exc.errors()[0]["loc"] and not settings.get("teacher") and asked:
            raise LorafleetError(
                f"{' and '.join(asked)} need{'s' if len(asked) == 1 else ''} a teacher: "
                "add --teacher-url URL and --teacher-model NAME"
            ) from None
        problem = _option_problem(exc, _SYNTHESIS_FLAGS, typed, "synthesis")
        raise LorafleetError(f"invalid option: {problem}") from None
    typed = {f"teacher.{k}" for k, v in teacher.items() if v is not None}
    judged = (("model", judge_model), ("min_score", min_score))
    typed |= {f"judge.{k}" for k, v in judged if v is not None}
    _teacher_flags_need_teacher(synthesis.generator, typed, generator, chosen)
    names = _teacher_names(typed, chosen is not None and chosen.synthesis.teacher is not None)
    total = len(records) * synthesis.per_seed if synthesis.generator == "teacher" else None
    with _progress(f"synthesizing ({synthesis.generator})", total) as advance:
        result = synthesize(
            records,
            synthesis,
            definition,
            chosen.data if chosen else None,
            work_dir or Path(str(out) + ".work"),
            on_job=advance,
            pool=pool_records,
            names=names,
        )
    dump_records(out, result.records)
    dropped = result.stats.get("dropped") or {}
    console.print(
        f"wrote {out}: {len(result.records)} synthetic records"
        + (f"; dropped {', '.join(f'{k} {v}' for k, v in dropped.items())}" if dropped else "")
    )


def _teacher_flags_need_teacher(
    resolved: str, typed: set[str], generator: str | None, chosen
) -> None:
    """Refuse teacher (and judge) options when the generator that runs is not the teacher:
    they would be ignored, and the user who typed them expects a teacher run.

    Args:
        resolved: the generator that would run.
        typed: the ``teacher.*`` and ``judge.*`` settings the user gave as options.
        generator: ``--generator`` as typed (``None``: not given).
        chosen: the ``--spec`` expert, or ``None``.

    Raises:
        LorafleetError: naming the first such option and where the generator came from.
    """
    if resolved == "teacher" or not typed:
        return
    flag = next(_SYNTHESIS_FLAGS[p] for p in _SYNTHESIS_FLAGS if p in typed)
    origin = (
        f"--generator {generator}"
        if generator is not None
        else "the --spec expert's synthesis.generator"
        if chosen is not None
        else "the default"
    )
    raise LorafleetError(
        f"{flag}: only the teacher generator uses it, and the generator is {resolved} "
        f"({origin}): add --generator teacher, or leave {flag} out"
    )


def _teacher_names(typed: set[str], from_spec: bool):
    """How the teacher's errors name its URL and key: the flag when the user typed it, or
    when no spec gave the value (a default the flag changes); else the spec's field."""
    from lorafleet.llm import EndpointNames

    spec = EndpointNames.spec("synthesis.teacher")

    def name(field: str) -> str:
        typed_it = f"teacher.{field}" in typed
        return (
            _SYNTHESIS_FLAGS[f"teacher.{field}"]
            if typed_it or not from_spec
            else getattr(spec, field)
        )

    key_env = name("api_key_env")
    no_key = f"pass {key_env} ''" if key_env.startswith("--") else spec.no_key
    return EndpointNames(name("base_url"), key_env, no_key, name("api_key_file"))


@app.command("curate")
def data_curate(
    seeds: Annotated[Path, typer.Option(help="The human seed records.")],
    eval_set: Annotated[
        Path, typer.Option("--eval", help="The held-out eval records nothing may overlap.")
    ],
    out: Annotated[Path, typer.Option(help="Where the curated training set goes (JSONL).")],
    synthetic: Annotated[
        list[Path] | None,
        typer.Option(help="Synthetic records; repeat for shards (merged in seed order)."),
    ] = None,
    stats: Annotated[
        Path | None,
        typer.Option(help="Write the stats artifact (JSON) here, and Markdown beside it."),
    ] = None,
    spec: SpecOpt = None,
    expert: ExpertOpt = None,
    max_synthetic_ratio: Annotated[
        float | None, typer.Option(help="At most this many synthetic rows per human row.")
    ] = None,
    near_dup_threshold: Annotated[
        float | None, typer.Option(help="Estimated Jaccard similarity that makes a near-duplicate.")
    ] = None,
    pii: Annotated[
        str | None, typer.Option(help="scrub, reject or off (default: the spec's, else scrub).")
    ] = None,
) -> None:
    """Scrub personal data, drop exact and near duplicates and eval overlap, cap synthetic rows.

    Every kept row carries meta.provenance; the stats give counts per stage and drops per reason.
    """
    from lorafleet.data.curate import curate
    from lorafleet.data.report import stats_markdown
    from lorafleet.data.shard import merge_records
    from lorafleet.fleet import CurationSettings, DataRules, SynthesisSettings
    from lorafleet.io import atomic_write_json, atomic_write_text
    from lorafleet.records import dump_records, read_records

    chosen = _expert(spec, expert)
    human = [r for _, r in read_records(seeds)]
    shards = [[r for _, r in read_records(p)] for p in synthetic or []]
    eval_records = [r for _, r in read_records(eval_set)]
    try:
        settings = CurationSettings.model_validate(
            {
                **(chosen.curation.model_dump() if chosen else {}),
                **(
                    {"near_dup_threshold": near_dup_threshold}
                    if near_dup_threshold is not None
                    else {}
                ),
            }
        )
        synthesis = chosen.synthesis if chosen else SynthesisSettings()
        if max_synthetic_ratio is not None:  # checked as the spec's field would be
            synthesis = SynthesisSettings.model_validate(
                {**synthesis.model_dump(), "max_synthetic_ratio": max_synthetic_ratio}
            )
        ratio = synthesis.max_synthetic_ratio
        policy = DataRules.model_validate(
            {"pii": pii or (chosen.data.pii if chosen else "scrub")}
        ).pii
    except ValidationError as exc:
        typed = {
            "near_dup_threshold": near_dup_threshold,
            "pii": pii,
            "max_synthetic_ratio": max_synthetic_ratio,
        }
        typed = {path: value for path, value in typed.items() if value is not None}
        problem = _option_problem(exc, _CURATION_FLAGS, typed, "curation")
        raise LorafleetError(f"invalid option: {problem}") from None
    generated = merge_records(shards, human)
    with _progress("curating", len(human) + len(generated)) as advance:
        result = curate(human, generated, eval_records, settings, ratio, pii=policy, on_row=advance)
    dump_records(out, result.records)
    if stats is not None:
        atomic_write_json(stats, result.stats)
        atomic_write_text(stats.with_suffix(".md"), stats_markdown(result.stats))
    o = result.stats["output"]
    dropped = ", ".join(f"{k} {v}" for k, v in result.stats["dropped"].items()) or "nothing"
    console.print(
        f"wrote {out}: {o['total']} records ({o['human']} human, {o['synthetic']} synthetic); dropped {dropped}"
    )


@app.command("stats")
def data_stats(
    files: Annotated[list[Path], typer.Argument(help="Data files (.jsonl or .jsonl.gz).")],
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Also write the numbers as JSON to this file ('-': stdout)."),
    ] = None,
) -> None:
    """Describe data files: records by task, source and generator, turns, lengths, personal data.

    The table goes to stdout; with ``--json -`` the JSON does instead (for scripts)."""
    from rich.table import Table

    from lorafleet.data.pii import record_pii
    from lorafleet.records import iter_records

    table = Table(
        "file",
        "records",
        "tasks",
        "sources",
        "generators",
        "turns (mean)",
        "chars (mean)",
        "personal data",
    )
    numbers = {}
    for path in files:
        counts: dict[str, Counter] = {
            "task": Counter(),
            "source": Counter(),
            "generator": Counter(),
            "pii": Counter(),
        }
        n = turns = chars = 0
        with _progress(f"reading {path.name}", None) as advance:
            for _, r in iter_records(path):
                n += 1
                turns += len(r.messages)
                chars += sum(len(m.content) for m in r.messages)
                counts["task"][r.task] += 1
                counts["source"][r.source] += 1
                counts["generator"][
                    r.meta.get("generator", "human" if r.source == "human" else "?")
                ] += 1
                counts["pii"] += record_pii(r)
                advance()
        numbers[str(path)] = {
            "records": n,
            "mean_turns": round(turns / max(n, 1), 2),
            "mean_chars": round(chars / max(n, 1), 1),
            **{k: dict(v) for k, v in counts.items()},
        }
        table.add_row(
            str(path),
            str(n),
            *(
                ", ".join(f"{k} {v}" for k, v in counts[c].most_common())
                for c in ("task", "source", "generator")
            ),
            f"{turns / max(n, 1):.1f}",
            f"{chars / max(n, 1):.0f}",
            ", ".join(f"{k} {v}" for k, v in counts["pii"].items()) or "none",
        )
    if json_out is not None:
        write_json_result(json_out, numbers)
    if str(json_out) != "-":
        out.print(table)
