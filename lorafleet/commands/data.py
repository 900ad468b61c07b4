"""``lorafleet data``: validate data files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorafleet.console import console

app = typer.Typer(help="Validate, synthesize and curate data.", no_args_is_help=True)


@app.command("validate")
def data_validate(
    file: Annotated[Path, typer.Argument(help="A .jsonl or .jsonl.gz file of records.")],
    task: Annotated[str, typer.Option(help="The expert task every record must carry.")],
    max_chars: Annotated[int, typer.Option(help="Longest allowed message.")] = 8000,
) -> None:
    """Run the great-expectations suite on one data file; every failure is FILE:LINE: rule: detail."""
    from lorafleet.data.validate import validate_file
    from lorafleet.fleet import DataRules

    report = validate_file(file, task, DataRules(max_chars=max_chars))
    for line in report.lines():
        typer.echo(line, err=True)
    if not report.success:
        raise typer.Exit(2)
    console.print(f"{file}: ok — {report.rows} records pass {len(report.expectations)} expectations")
