"""The ``lorafleet`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorafleet import __version__
from lorafleet.commands import data, deploy, registry, rollout, router, serve, submit, train
from lorafleet.commands import eval as eval_cmd
from lorafleet.commands import spec as spec_cmd
from lorafleet.commands.runner import run_app
from lorafleet.console import console

__all__ = ["app", "main"]

app = typer.Typer(
    help="Build, gate and ship a fleet of LoRA experts on one shared base model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"lorafleet {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Build, gate and ship a fleet of LoRA experts on one shared base model."""


base_app = typer.Typer(help="Build the shared base model.", no_args_is_help=True)
app.add_typer(base_app, name="base")

# Sub-command groups: one module per area under lorafleet/commands/, one line each here.
# Keep heavy imports (torch, peft, kfp, great_expectations) inside the command functions.
app.add_typer(data.app, name="data")
app.add_typer(deploy.app, name="deploy")
app.add_typer(eval_cmd.app, name="eval")
app.add_typer(registry.app, name="registry")
app.add_typer(rollout.app, name="rollout")
app.add_typer(spec_cmd.app, name="spec")
app.add_typer(train.app, name="train")
app.command("submit")(submit.submit)
app.command("serve")(serve.serve)
app.command("router")(router.router)
# end of sub-command groups

SpecFile = Annotated[Path, typer.Argument(help="The fleet spec (YAML).")]


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
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output YAML (default: fleet_pipeline[-PROFILE].yaml in the current directory)."
        ),
    ] = None,
    spec: Annotated[
        Path | None,
        typer.Option(help="Fleet spec whose pipeline.profiles hold --profile's settings."),
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(
            help="Cluster profile (aws, gcp, onprem): add its Kubernetes settings to every step."
        ),
    ] = None,
    image: Annotated[
        str | None,
        typer.Option(
            help="Component image of every step, best pinned by digest "
            "(REGISTRY/PATH@sha256:...; default: the release image)."
        ),
    ] = None,
) -> None:
    """Compile the fleet pipeline to the IR YAML you upload in the Kubeflow Pipelines UI.

    It never rewrites the committed pipelines/*.yaml (developers regenerate those with
    `make goldens`)."""
    from lorafleet.fleet import load_fleet
    from lorafleet.pipelines.compile import GOLDEN, compile_fleet, profile_golden
    from lorafleet.pipelines.platform import spec_profile

    platform = spec_profile(spec, profile) if profile else None
    base = load_fleet(spec, check_files=False).base if profile else None
    out = out or Path((profile_golden(profile) if profile else GOLDEN).name)
    compile_fleet(out, platform, image=image, base=base)
    console.print(f"wrote {out}")


@app.command("run")
def run(
    file: SpecFile,
    runs_dir: Annotated[Path, typer.Option(help="Where run folders go.")] = Path("runs"),
    run_id: Annotated[
        str | None, typer.Option(help="Name of the run folder (default: a timestamp).")
    ] = None,
    expert: Annotated[
        list[str] | None, typer.Option(help="Run only this expert; repeat for more (default: all).")
    ] = None,
) -> None:
    """Run the whole fleet pipeline locally through kfp.local: validate, synthesize, curate,
    train, evaluate, gate, register and serve every expert; write runs/<id>/summary.json and report.html.

    An expert whose step fails stops only itself: the others are published, and the run then
    exits 1 naming each failed expert, its step and error."""
    from lorafleet.local import ExpertsFailed, PipelineFailed, run_local
    from lorafleet.report import rich_table

    try:
        run_dir, summary = run_local(file, runs_dir=runs_dir, run_id=run_id, experts=expert)
    except ExpertsFailed as exc:  # the others were published: show them, then the failure
        console.print(rich_table(exc.summary))
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except PipelineFailed as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    console.print(rich_table(summary))
    console.print(
        f"run {summary['run_id']} finished in {summary['wall_time_s']} s: {run_dir}/summary.json, {run_dir}/report.html"
    )


def main() -> None:
    """Entry point of ``lorafleet``: user mistakes become one line on stderr and exit code 2."""
    run_app(app)


if __name__ == "__main__":
    main()
