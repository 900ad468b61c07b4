"""The gate of an expert: loss and task-metric rules against the base and production, and the
optional pairwise LLM judge."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from lorafleet.fleet.common import StrictModel

if TYPE_CHECKING:
    from lorafleet.fleet.serving import ServingSpec

__all__ = ["GateJudge", "GatePolicy", "pick_engine"]


class GateJudge(StrictModel):
    """LLM-as-judge, pairwise against production (or the base): any OpenAI-compatible endpoint."""

    base_url: str = Field(description="OpenAI API root, e.g. http://127.0.0.1:8080/openai/v1")
    model: str = Field(description="the judge's served model name")
    api_key_env: str | None = Field(None, description="environment variable that holds the API key")
    min_win_rate_lower_bound: float = Field(
        0.5, ge=0, le=1, description="the win rate's lower confidence bound must be >= this"
    )
    min_parse_rate: float = Field(
        0.9,
        ge=0,
        le=1,
        description="share of verdicts that must parse ([[A]], [[B]], [[TIE]]); unparseable ones score nothing",
    )
    confidence: float = Field(
        0.95, gt=0, lt=1, description="two-sided level of the bootstrap interval"
    )
    resamples: int = Field(1000, ge=100, description="bootstrap resamples (seeded)")
    max_items: int | None = Field(None, ge=1, description="judge only the first N eval records")


class GatePolicy(StrictModel):
    """When a candidate may be registered."""

    max_loss_ratio: float = Field(
        0.98, gt=0, description="candidate held-out loss must be <= this x the base model's"
    )
    min_metrics: dict[str, float] = Field(default_factory=dict, description="task metric floors")
    max_loss_regression: float = Field(
        0.01, ge=0, description="candidate loss may exceed production's by at most this fraction"
    )
    max_metric_regression: float = Field(
        0.05, ge=0, description="each task metric may drop below production's by at most this much"
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="generation budget for task metrics (default: the task's)"
    )
    judge: GateJudge | None = Field(
        None, description="pairwise LLM judge; its rule applies when set"
    )
    engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto",
        description="what runs the evaluation: transformers (one device) or vLLM with "
        "--tensor-parallel-size serving.gpus, for a base one device cannot hold (the evaluate "
        "step then needs vLLM and that many GPUs); auto: vllm when serving.runtime is vllm "
        "and serving.gpus > 1, else transformers",
    )


def pick_engine(
    engine: Literal["auto", "transformers", "vllm"], serving: ServingSpec
) -> Literal["transformers", "vllm"]:
    """What runs an expert's evaluation (the gate's ``engine``).

    ``auto`` is vLLM when the base is served by vLLM over several GPUs
    (``serving.runtime: vllm``, ``serving.gpus > 1``): one device cannot hold it, so one
    device cannot evaluate it either. Anything else fits one device: transformers.
    """
    if engine != "auto":
        return engine
    return "vllm" if serving.runtime == "vllm" and serving.gpus > 1 else "transformers"
