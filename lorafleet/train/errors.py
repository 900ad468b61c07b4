"""Training failures a user can act on: one line each, exit code 2 from the CLI."""

from __future__ import annotations

from lorafleet.errors import LorafleetError

__all__ = ["NonFiniteLossError", "QLoraUnavailableError", "ResumeMismatchError", "TrainingOOMError"]


class NonFiniteLossError(LorafleetError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingOOMError(LorafleetError):
    """The accelerator ran out of memory during a step."""


class ResumeMismatchError(LorafleetError):
    """A checkpoint was written for another base model, adapter or data plan."""


class QLoraUnavailableError(LorafleetError):
    """The spec asks for QLoRA where no CUDA GPU or bitsandbytes is present."""
