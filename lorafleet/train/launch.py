"""Run a training job with ``training.launcher: torchrun``: several DDP or FSDP ranks on this
machine (``training.sharding``).

Each rank is ``python -m lorafleet.train.job JOB.json`` started by torchrun (standalone
rendezvous on this host); ranks use NCCL on GPUs and gloo on CPU
(:mod:`lorafleet.train.distributed`). The job file is written next to the checkpoints.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from lorafleet.errors import LorafleetError
from lorafleet.train.job import TrainJobConfig

__all__ = ["run_torchrun", "torchrun_command"]

log = logging.getLogger(__name__)


def torchrun_command(job_file: str | Path, nproc: int) -> list[str]:
    """The torchrun command line that runs ``job_file`` on ``nproc`` local ranks."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "--module",
        "lorafleet.train.job",
        str(job_file),
    ]


def run_torchrun(job: TrainJobConfig, nproc: int, env: dict[str, str] | None = None) -> dict:
    """Train with ``nproc`` DDP or FSDP ranks under torchrun; the ranks' output goes to this log.

    Args:
        job: the training job.
        nproc: ranks on this machine (``training.gpus_per_node``).
        env: the ranks' environment (default: this process's).

    Returns:
        Rank 0's result (``<run_dir>/result.json``, ``TrainResult.to_dict()``): steps,
        tokens, tokens/s, wall time, the per-step losses and learning rates.

    Raises:
        LorafleetError: when a rank fails, with its one-line error (or torchrun's last line).
    """
    run_dir = Path(job.run_dir or f"{job.output_dir}.run")
    run_dir.mkdir(parents=True, exist_ok=True)
    job_file = job.write(run_dir / "job.json")
    result = run_dir / "result.json"  # rank 0 writes it last
    result.unlink(missing_ok=True)
    errors, last = [], ""
    # One merged pipe read line by line: the ranks' progress reaches the log as it happens.
    with subprocess.Popen(
        torchrun_command(job_file, nproc),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            log.info("torchrun: %s", line)
            if line.startswith(
                "error: "
            ):  # a rank's own one-line error says more than torchrun's summary
                errors.append(line.removeprefix("error: "))
            last = line or last
    if proc.returncode != 0:
        raise LorafleetError(
            f"torchrun with {nproc} ranks exited {proc.returncode}: {errors[0] if errors else last}"
        )
    if not result.is_file():
        raise LorafleetError(f"torchrun: the ranks exited 0 but rank 0 wrote no {result}")
    return json.loads(result.read_text())
