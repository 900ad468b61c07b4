"""The ``lorafleet`` command line."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from lorafleet.commands import data, deploy, rollout, submit, train
from lorafleet.commands import eval as eval_cmd
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
app.add_typer(deploy.app, name="deploy")
app.add_typer(eval_cmd.app, name="eval")
app.add_typer(rollout.app, name="rollout")
app.add_typer(train.app, name="train")
app.command("submit")(submit.submit)
# end of sub-command groups

SpecFile = Annotated[Path, typer.Argument(help="The fleet spec (YAML).")]


@spec_app.command("check")
def spec_check(file: SpecFile) -> None:
    """Validate a fleet spec; errors are printed as FILE:LINE: field.path: message."""
    from lorafleet.fleet import load_fleet

    spec = load_fleet(file)
    console.print(
        f"{file}: ok — fleet {spec.name!r}, {len(spec.experts)} experts: {', '.join(e.name for e in spec.experts)}"
    )


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
            help="Output YAML (default: the committed pipelines/fleet_pipeline[-PROFILE].yaml)."
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
) -> None:
    """Compile the fleet pipeline to the IR YAML you upload in the Kubeflow Pipelines UI."""
    from lorafleet.pipelines.compile import GOLDEN, compile_fleet, profile_golden
    from lorafleet.pipelines.platform import spec_profile

    platform = spec_profile(spec, profile) if profile else None
    out = out or (profile_golden(profile) if profile else GOLDEN)
    compile_fleet(out, platform)
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
    train, evaluate, gate, register and serve every expert; write runs/<id>/summary.json and report.html."""
    from lorafleet.local import PipelineFailed, run_local
    from lorafleet.report import rich_table

    try:
        run_dir, summary = run_local(file, runs_dir=runs_dir, run_id=run_id, experts=expert)
    except PipelineFailed as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    console.print(rich_table(summary))
    console.print(
        f"run {summary['run_id']} finished in {summary['wall_time_s']} s: {run_dir}/summary.json, {run_dir}/report.html"
    )


@app.command("serve")
def serve(
    base: Annotated[str, typer.Option(help="Base model directory or hub id.")],
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=SOURCE of an adapter (directory, pvc://, s3://, gs://); repeat for more."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 inside a pod.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8080,
    name: Annotated[str, typer.Option(help="Served name of the base model.")] = "base",
    max_batch_size: Annotated[int, typer.Option(help="Most requests in one batch.")] = 64,
    max_wait_ms: Annotated[
        float, typer.Option(help="How long a request waits for others to share its batch.")
    ] = 10.0,
    max_queue: Annotated[
        int, typer.Option(help="Most requests waiting; more get 429 + Retry-After.")
    ] = 256,
    request_timeout: Annotated[
        float, typer.Option(help="Seconds a request may take, queueing included; later 503.")
    ] = 120.0,
    max_rank: Annotated[int, typer.Option(help="Largest LoRA rank admitted.")] = 64,
    require_lineage: Annotated[
        bool,
        typer.Option(help="Refuse adapters without lineage.json (default: check it when present)."),
    ] = False,
    routes: Annotated[
        Path | None,
        typer.Option(
            help='JSON file {"routes": {NAME: {"targets": [...]}}} of weighted adapter versions.'
        ),
    ] = None,
    admin_token_env: Annotated[
        str,
        typer.Option(
            help="Environment variable holding the /admin bearer token; unset disables /admin."
        ),
    ] = "LORAFLEET_ADMIN_TOKEN",
    adapter_cache: Annotated[
        Path | None, typer.Option(help="Download directory of s3:// and gs:// adapters.")
    ] = None,
    lora_backend: Annotated[
        str,
        typer.Option(
            help="batched: all adapters stacked, one pass per LoRA layer; peft: PEFT's per-adapter loop (the reference)."
        ),
    ] = "batched",
    fault: Annotated[
        list[str] | None,
        typer.Option(
            help="Canary drills only: NAME:KEY=VALUE,... makes adapter NAME fail or slow down (keys: error_rate, added_latency_ms, status); repeat for more; also settable at /admin/faults."
        ),
    ] = None,
) -> None:
    """Serve the base and adapters: OpenAI-compatible API, KServe health, /metrics and /admin.

    Every adapter is checked before it serves (safetensors, rank, target modules, base
    fingerprint, shapes, effect on the output); a failed check is one line and exit code 2.
    The runtime image runs the same command as python -m lorafleet.serve.runtime.
    """
    from lorafleet.serve.faults import FaultTable, parse_fault
    from lorafleet.serve.router import RouteTable
    from lorafleet.serve.runtime import serve as run_server

    if lora_backend not in ("batched", "peft"):
        raise LorafleetError(f"--lora-backend {lora_backend!r}: expected batched or peft")
    adapters = {}
    for item in adapter or []:
        adapter_name, sep, path = item.partition("=")
        if not sep or not adapter_name or not path:
            raise LorafleetError(f"--adapter {item!r}: expected NAME=SOURCE")
        if adapter_name in adapters:
            raise LorafleetError(f"--adapter {item!r}: name {adapter_name!r} given twice")
        adapters[adapter_name] = path
    faults = FaultTable(dict(parse_fault(f) for f in fault or []))
    run_server(
        base,
        adapters,
        host=host,
        port=port,
        name=name,
        max_batch_size=max_batch_size,
        max_wait_s=max_wait_ms / 1000,
        admin_token=os.environ.get(admin_token_env) or None,
        max_queue=max_queue,
        request_timeout_s=request_timeout,
        max_rank=max_rank,
        require_lineage=require_lineage,
        routes=RouteTable.from_file(routes) if routes else None,
        adapter_cache=str(adapter_cache) if adapter_cache else None,
        faults=faults,
        lora_backend=lora_backend,
    )


# `python -m lorafleet.serve.runtime` (the runtime image's entry point): the serve command alone.
serve_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
serve_app.command()(serve)


def main(command: typer.Typer | None = None, **options: Any) -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2.

    Args:
        command: the app to run (default: ``lorafleet``; the kubectl plugin passes its own).
        **options: passed to click (``prog_name``, ``obj``).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    level = os.environ.get("LORAFLEET_LOG", "WARNING")
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # Libraries (great-expectations) set their own loggers to INFO: filter at the handler.
    for handler in logging.root.handlers:
        handler.setLevel(level)
    try:
        # Outside standalone mode click returns the code of a typer.Exit instead of exiting.
        code = (command or app)(standalone_mode=False, **options)
        sys.exit(code if isinstance(code, int) else 0)
    except LorafleetError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code)
    except Exception as exc:  # click usage errors and aborts carry their own exit codes
        import click

        # Recent typer versions raise their own copy of click's exceptions (typer.TyperException).
        if isinstance(exc, click.ClickException | typer.TyperException) and hasattr(exc, "show"):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort | typer.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
