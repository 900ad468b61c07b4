"""One training job as a JSON file, and the process entry point that runs it.

The same job file drives a plain process, each ``torchrun`` rank (DDP) and each pod of a
Kubeflow TrainJob: ``python -m lorafleet.train.job JOB.json``. Passing a file keeps the
command line short and every setting typed (the spec's own pydantic models).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from lorafleet.fleet import LoraSettings, TrainingSettings
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
    """

    model_config = ConfigDict(extra="forbid")

    base_dir: str
    train_set: str
    output_dir: str
    run_dir: str | None = None
    resume: bool = False
    threads: int = Field(0, ge=0)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)

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
        job.base_dir, records, job.lora, job.training, job.output_dir, run_dir=job.run_dir, resume=job.resume
    )
    return result.to_dict()


def main(argv: list[str] | None = None) -> None:
    """``python -m lorafleet.train.job JOB.json``: user mistakes exit 2 with one line."""
    from lorafleet.errors import LorafleetError

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m lorafleet.train.job JOB.json")
    try:
        job = TrainJobConfig.model_validate(json.loads(Path(args[0]).read_text()))
        result = run_job(job)
    except LorafleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    print(json.dumps({k: result[k] for k in ("steps", "train_tokens", "tokens_per_s", "wall_s")}))


if __name__ == "__main__":
    main()
