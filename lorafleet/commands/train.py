"""``lorafleet train``: run an expert's training job here, under torchrun, or on the cluster."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from lorafleet.console import console

app = typer.Typer(
    help="Train an expert's LoRA adapter: here, under torchrun (DDP), or as a Kubeflow job.",
    no_args_is_help=True,
)

SpecArg = Annotated[Path, typer.Argument(help="The fleet spec (YAML).")]
ExpertOpt = Annotated[
    str, typer.Option(help="The expert to train (its lora: and training: blocks).")
]
BaseOpt = Annotated[
    str, typer.Option("--base", help="Base model directory (as the trainer sees it).")
]
TrainSetOpt = Annotated[
    str, typer.Option("--train-set", help="Training records, JSONL (as the trainer sees it).")
]
OutputOpt = Annotated[
    str, typer.Option("--output", help="Where the adapter goes; checkpoints go to OUTPUT.run.")
]


def _job(spec: Path, expert: str, base: str, train_set: str, output: str, resume: bool):
    from lorafleet.fleet import load_fleet
    from lorafleet.train.job import TrainJobConfig

    fleet = load_fleet(spec)
    settings = fleet.expert(expert)
    job = TrainJobConfig(
        base_dir=base,
        train_set=train_set,
        output_dir=output,
        resume=resume,
        lora=settings.lora,
        training=settings.training,
        base_revision=fleet.base.revision,
        base_dtype=fleet.base.dtype,
    )
    return settings, job, fleet.base.hub_token_secret


@app.command("run")
def run_cmd(
    spec: SpecArg,
    expert: ExpertOpt,
    base: BaseOpt,
    train_set: TrainSetOpt,
    output: OutputOpt,
    resume: Annotated[
        bool, typer.Option(help="Continue from the newest checkpoint in OUTPUT.run.")
    ] = False,
) -> None:
    """Train on this machine: in this process (launcher: local) or as
    training.gpus_per_node DDP ranks under torchrun (launcher: torchrun)."""
    from lorafleet.errors import LorafleetError
    from lorafleet.train.job import run_job
    from lorafleet.train.launch import run_torchrun

    settings, job, _ = _job(spec, expert, base, train_set, output, resume)
    launcher = settings.training.launcher
    if launcher == "trainjob":
        raise LorafleetError(
            f"experts.{expert}.training.launcher is 'trainjob': use `lorafleet train submit`"
        )
    if launcher == "torchrun":
        summary = run_torchrun(job, settings.training.gpus_per_node)
    else:
        with console.status(f"training {expert}"):
            summary = run_job(job)
    mfu = f", MFU {summary['mfu']:.1%}" if summary.get("mfu") is not None else ""
    console.print(
        f"{output}: {summary['steps']} steps, {summary['train_tokens']} tokens, {summary['tokens_per_s']} tokens/s, "
        f"{summary.get('tflops_per_s', 0):g} model TFLOP/s{mfu}"
    )


@app.command("submit")
def submit_cmd(
    spec: SpecArg,
    expert: ExpertOpt,
    base: BaseOpt,
    train_set: TrainSetOpt,
    output: OutputOpt,
    name: Annotated[
        str | None, typer.Option(help="Job name (default: lorafleet-EXPERT-TIMESTAMP).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the job object (JSON) instead of creating it.")
    ] = False,
    wait: Annotated[
        bool, typer.Option(help="Follow the job until it ends, printing each status change.")
    ] = True,
    poll: Annotated[
        float, typer.Option(help="Seconds between status reads while following.")
    ] = 10.0,
    kubeconfig: Annotated[
        Path | None,
        typer.Option(help="Kubeconfig file (default: $KUBECONFIG, ~/.kube/config or in-cluster)."),
    ] = None,
) -> None:
    """Create the expert's multi-node training job (launcher: trainjob) and follow it.

    A Kubeflow Trainer TrainJob where the cluster serves trainer.kubeflow.org/v1alpha1,
    else a Training Operator PyTorchJob. Paths are as the job's pods see them: under
    training.cluster.volume.mount_path. Exits 2 when the job fails or times out.
    """
    from lorafleet.errors import LorafleetError
    from lorafleet.kube import kube_api
    from lorafleet.train.cluster import build_trainjob, submit_job, wait_for_job

    settings, job, hub_secret = _job(spec, expert, base, train_set, output, resume=True)
    if settings.training.launcher != "trainjob":
        raise LorafleetError(
            f"experts.{expert}.training.launcher is {settings.training.launcher!r}; submit needs 'trainjob'"
        )
    name = name or f"lorafleet-{expert}-{time.strftime('%Y%m%d%H%M%S')}"[:63]
    if dry_run:
        typer.echo(json.dumps(build_trainjob(name, job, settings.training, hub_secret), indent=2))
        return
    with kube_api(kubeconfig) as api:
        kind, created = submit_job(api, name, job, settings.training, hub_secret)
        namespace = created["metadata"]["namespace"]
        console.print(f"{kind.kind}/{name} created in {namespace}")
        if wait:
            cluster = settings.training.cluster
            wait_for_job(
                api,
                kind,
                namespace,
                name,
                cluster.timeout_s,
                poll,
                lambda line: console.print(f"{kind.kind}/{name}: {line}"),
            )
