"""The ``lorafleet`` command line."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from lorafleet.commands import data
from lorafleet.console import console
from lorafleet.errors import LorafleetError

app = typer.Typer(
    help="Build, gate and ship a fleet of LoRA experts on one shared base model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
spec_app = typer.Typer(help="Check fleet specs.", no_args_is_help=True)
base_app = typer.Typer(help="Build the shared base model.", no_args_is_help=True)
app.add_typer(spec_app, name="spec")
app.add_typer(base_app, name="base")

# Sub-command groups: one module per area under lorafleet/commands/, one line each here.
# Keep heavy imports (torch, peft, kfp, great_expectations) inside the command functions.
app.add_typer(data.app, name="data")
# end of sub-command groups

SpecFile = Annotated[Path, typer.Argument(help="The fleet spec (YAML).")]


@spec_app.command("check")
def spec_check(file: SpecFile) -> None:
    """Validate a fleet spec; errors are printed as FILE:LINE: field.path: message."""
    from lorafleet.fleet import load_fleet

    spec = load_fleet(file)
    console.print(f"{file}: ok — fleet {spec.name!r}, {len(spec.experts)} experts: {', '.join(e.name for e in spec.experts)}")


@base_app.command("build")
def base_build(file: SpecFile = Path("examples/fleet.yaml")) -> None:
    """Build the demo base model of a spec (cached by fingerprint) and print its directory."""
    from lorafleet.fleet import load_fleet
    from lorafleet.stages import build_base

    with console.status("building the base model (tokenizer, model, brief pre-training)"):
        path = build_base(load_fleet(file))
    typer.echo(path)


@app.command("compile")
def compile_pipeline(
    out: Annotated[Path | None, typer.Option(help="Output YAML (default: the committed pipelines/fleet_pipeline.yaml).")] = None,
) -> None:
    """Compile the fleet pipeline to the IR YAML you upload in the Kubeflow Pipelines UI."""
    from lorafleet.pipelines.compile import GOLDEN, compile_fleet

    out = out or GOLDEN
    compile_fleet(out)
    console.print(f"wrote {out}")


@app.command("run")
def run(
    file: SpecFile,
    runs_dir: Annotated[Path, typer.Option(help="Where run folders go.")] = Path("runs"),
    run_id: Annotated[str | None, typer.Option(help="Name of the run folder (default: a timestamp).")] = None,
    expert: Annotated[list[str] | None, typer.Option(help="Run only this expert; repeat for more (default: all).")] = None,
) -> None:
    """Run the whole fleet pipeline locally through kfp.local: validate, synthesize, curate,
    train, evaluate, gate, register and serve every expert; write runs/<id>/summary.json and report.html."""
    from lorafleet.local import PipelineFailed, run_local
    from lorafleet.report import rich_table

    try:
        run_dir, summary = run_local(file, runs_dir=runs_dir, run_id=run_id, experts=expert)
    except PipelineFailed as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    console.print(rich_table(summary))
    console.print(f"run {summary['run_id']} finished in {summary['wall_time_s']} s: {run_dir}/summary.json, {run_dir}/report.html")


@app.command("serve")
def serve(
    base: Annotated[str, typer.Option(help="Base model directory or hub id.")],
    adapter: Annotated[list[str] | None, typer.Option(help="NAME=PATH of an adapter; repeat for more.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8080,
) -> None:
    """Serve the base and adapters with the OpenAI-compatible lorafleet runtime."""
    from lorafleet.serve.runtime import serve as run_server

    adapters = {}
    for item in adapter or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise LorafleetError(f"--adapter {item!r}: expected NAME=PATH")
        adapters[name] = Path(path)
    run_server(base, adapters, host=host, port=port)


def main() -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    level = os.environ.get("LORAFLEET_LOG", "WARNING")
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # Libraries (great-expectations) set their own loggers to INFO: filter at the handler.
    for handler in logging.root.handlers:
        handler.setLevel(level)
    try:
        # Outside standalone mode click returns the code of a typer.Exit instead of exiting.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except LorafleetError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code)
    except Exception as exc:  # click usage errors and aborts carry their own exit codes
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
