"""One training job as a JSON file, and the process entry point that runs it.

The same job file drives a plain process, each ``torchrun`` rank (DDP or FSDP) and each pod of a
Kubeflow TrainJob: ``python -m lorafleet.train.job JOB.json`` (pods read it from an
environment variable: ``--env VAR``). Passing a file keeps the
command line short and every setting typed (the spec's own pydantic models).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lorafleet.fleet import LoraSettings, TrainingSettings
from lorafleet.fleet.training import check_sharding
from lorafleet.io import atomic_write_json

__all__ = ["TrainJobConfig", "main", "run_job"]


class TrainJobConfig(BaseModel):
    """Everything one training run needs.

    Attributes:
        base_dir: the base model directory or hub id.
        train_set: a JSONL file of training records.
        output_dir: where the final adapter goes.
        run_dir: checkpoints and live metrics; default ``<output_dir>.run``.
        resume: continue from the newest checkpoint in ``run_dir``.
        threads: torch intra-op threads per process (0 keeps torch's default).
        base_revision: the base's hub revision (the spec's ``base.revision``).
        base_dtype: the base's weight dtype (the spec's ``base.dtype``).
    """

    model_config = ConfigDict(extra="forbid")

    base_dir: str
    train_set: str
    output_dir: str
    run_dir: str | None = None
    resume: bool = False
    threads: int = Field(0, ge=0)
    base_revision: str | None = None
    base_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)

    @model_validator(mode="after")
    def _fsdp_without_qlora(self) -> TrainJobConfig:
        check_sharding(self.lora, self.training)
        return self

    def write(self, path: str | Path) -> Path:
        """Save as JSON, atomically."""
        return atomic_write_json(path, self.model_dump(mode="json"))


def run_job(job: TrainJobConfig) -> dict:
    """Train as the job says (one rank of it under torchrun); return the result as a dict."""
    import torch

    from lorafleet.records import read_records
    from lorafleet.train.recipe import train_adapter

    if job.threads:
        torch.set_num_threads(job.threads)
    records = [r for _, r in read_records(job.train_set)]
    result = train_adapter(
        job.base_dir,
        records,
        job.lora,
        job.training,
        job.output_dir,
        run_dir=job.run_dir,
        resume=job.resume,
        revision=job.base_revision,
        dtype=job.base_dtype,
    )
    return result.to_dict()


def main(argv: list[str] | None = None) -> None:
    """``python -m lorafleet.train.job JOB.json`` (or ``--env VAR``: the job's JSON is in
    environment variable VAR, as in a cluster job's pods): user mistakes exit 2 with one line."""
    from lorafleet.errors import LorafleetError, first_problem

    args = sys.argv[1:] if argv is None else argv
    if not (len(args) == 1 or (len(args) == 2 and args[0] == "--env")):
        sys.exit("usage: python -m lorafleet.train.job JOB.json | --env VAR")
    source = f"${args[1]}" if args[0] == "--env" else args[0]
    try:
        try:
            text = os.environ[args[1]] if args[0] == "--env" else Path(args[0]).read_text()
            job = TrainJobConfig.model_validate(json.loads(text))
        except KeyError:
            raise LorafleetError(f"{source}: no such environment variable") from None
        except OSError as exc:
            raise LorafleetError(f"{source}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise LorafleetError(f"{source}: not JSON: {exc}") from None
        except ValidationError as exc:
            raise LorafleetError(f"{source}: {first_problem(exc, 'job')}") from None
        result = run_job(job)
    except LorafleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    print(json.dumps({k: result[k] for k in ("steps", "train_tokens", "tokens_per_s", "wall_s")}))


if __name__ == "__main__":
    main()
