"""The canary policy: steps, limits, and the analysis that judges each interval (docs/rollout.md)."""

from __future__ import annotations

import itertools
import re
import string
from typing import Literal

import promql_parser
from pydantic import Field, field_validator, model_validator

from lorafleet.fleet.common import StrictModel

__all__ = [
    "QUERY_PLACEHOLDERS",
    "QUERY_SAMPLE",
    "REVISION_QUERIES",
    "ROUTER_QUERIES",
    "CanaryAnalysis",
    "CanaryJudge",
    "CanaryPolicy",
    "check_promql",
]


# PromQL templates per canary mode; ``$route``, ``$version`` (the adapter or revision being
# measured), ``$namespace`` and ``$interval`` (e.g. ``30s``) are filled in per query.
ROUTER_QUERIES = {
    "requests": 'sum(increase(lorafleet_requests_total{model="$route",adapter="$version"}[$interval]))',
    # 5xx, and 404 (the version is missing on a replica): a client's other mistakes (4xx) say
    # nothing about the candidate (the same rule as lorafleet.rollout.sources.is_failure).
    "error_rate": 'sum(increase(lorafleet_requests_total{model="$route",adapter="$version",status=~"5..|404"}[$interval]))'
    ' / sum(increase(lorafleet_requests_total{model="$route",adapter="$version"}[$interval]))',
    "p95_latency_ms": "1000 * histogram_quantile(0.95, sum by (le) (increase("
    'lorafleet_request_latency_seconds_bucket{model="$route",adapter="$version"}[$interval])))',
}


# Knative's queue-proxy metrics: a revision canary runs on KServe's Serverless mode.
REVISION_QUERIES = {
    "requests": 'sum(increase(revision_request_count{namespace_name="$namespace",revision_name="$version"}[$interval]))',
    "error_rate": 'sum(increase(revision_request_count{namespace_name="$namespace",revision_name="$version",'
    'response_code_class="5xx"}[$interval])) / sum(increase(revision_request_count{namespace_name="$namespace",'
    'revision_name="$version"}[$interval]))',
    "p95_latency_ms": "histogram_quantile(0.95, sum by (le) (increase(revision_request_latencies_bucket{"
    'namespace_name="$namespace",revision_name="$version"}[$interval])))',
}


QUERY_PLACEHOLDERS = ("route", "version", "namespace", "interval")


# What the rollout fills in when it queries; a template must be valid PromQL with these.
QUERY_SAMPLE = {
    "route": "writer",
    "version": "writer-v2",
    "namespace": "lorafleet",
    "interval": "30s",
}


def check_promql(template: str, where: str) -> None:
    """Parse a query template, placeholders filled, with a PromQL parser (promql-parser,
    the Rust parser GreptimeDB uses), so a malformed query fails when the spec is read,
    not at the first analysis of a live rollout.

    Raises:
        ValueError: ``where``, then the parser's message.
    """
    query = string.Template(template).safe_substitute(QUERY_SAMPLE)
    try:
        promql_parser.parse(query)
    except ValueError as exc:
        raise ValueError(f"{where}: not valid PromQL ({exc})") from None


class CanaryJudge(StrictModel):
    """An online judge's sampled scores of live answers, as a metric the rollout reads."""

    min_score: float = Field(
        description="the canary's mean judge score per interval must reach this"
    )
    metric: str = Field(
        "lorafleet_judge_score",
        pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$",
        description="router source: a histogram/summary labelled model and adapter (mean = _sum / _count)",
    )
    query: str | None = Field(
        None, description="prometheus source: PromQL template of the mean score"
    )
    min_samples: int = Field(
        1, ge=1, description="fewer scored answers in an interval: inconclusive"
    )


class CanaryAnalysis(StrictModel):
    """Where each analysis reads its measurements, and how often."""

    source: Literal["router", "prometheus"] = Field(
        "router",
        description="router: scrape the router's /metrics; prometheus: PromQL over the HTTP API",
    )
    interval_seconds: float = Field(30, gt=0, description="seconds between analyses")
    min_requests: int = Field(
        20, ge=1, description="fewer canary requests in an interval: inconclusive"
    )
    error_limit: int = Field(
        4,
        ge=1,
        description="consecutive analyses that could not measure (source down) before the rollout aborts",
    )
    prometheus_url: str = Field(
        "", description="prometheus source: the server, e.g. http://prometheus.monitoring:9090"
    )
    queries: dict[Literal["requests", "error_rate", "p95_latency_ms"], str] = Field(
        default_factory=dict,
        description="PromQL templates replacing the mode's defaults (docs/rollout.md)",
    )
    judge: CanaryJudge | None = Field(
        None, description="optional: also gate on an online judge's score"
    )

    @model_validator(mode="after")
    def _source(self) -> CanaryAnalysis:
        if self.source == "prometheus" and not self.prometheus_url:
            raise ValueError("source 'prometheus' needs prometheus_url")
        templates = {f"queries.{k}": q for k, q in self.queries.items()}
        if self.judge and self.judge.query:
            templates["judge.query"] = self.judge.query
        for where, template in templates.items():
            unknown = sorted(
                set(re.findall(r"\$\{?([A-Za-z_]\w*)", template)) - set(QUERY_PLACEHOLDERS)
            )
            if unknown:
                raise ValueError(
                    f"unknown placeholder ${unknown[0]}; known: ${', $'.join(QUERY_PLACEHOLDERS)}"
                )
            check_promql(template, where)
        if self.source == "prometheus" and self.judge is not None and not self.judge.query:
            raise ValueError("judge with source 'prometheus' needs judge.query")
        return self


class CanaryPolicy(StrictModel):
    """Step-wise traffic shift from production to candidate, judged on metrics (docs/rollout.md)."""

    mode: Literal["router", "revision"] = Field(
        "router",
        description="router: adapter weights in the lorafleet router (other adapters untouched); "
        "revision: the InferenceService's canaryTrafficPercent (KServe Serverless mode)",
    )
    steps: list[int] = Field(default_factory=lambda: [10, 25, 50, 100])
    pause_seconds: int = Field(60, ge=0, description="least time at each step before the next")
    max_error_rate: float = Field(0.01, ge=0, le=1)
    max_p95_latency_ms: float = Field(2000, gt=0)
    failure_limit: int = Field(
        1, ge=1, description="failed analyses that roll the canary back (1: the first)"
    )
    inconclusive_limit: int = Field(
        2, ge=1, description="inconclusive analyses in a row that pause the rollout"
    )
    analysis: CanaryAnalysis = Field(default_factory=CanaryAnalysis)
    handoff: Literal["none", "drive", "controller"] = Field(
        "none",
        description="the pipeline's deploy step: none (no rollout), drive (run it to the end in the step) "
        "or controller (start it; the in-cluster controller drives it)",
    )
    drive_timeout_seconds: int = Field(
        3600, ge=1, description="handoff drive: give up waiting (the rollout stays)"
    )
    router_urls: list[str] = Field(
        default_factory=list,
        description="router mode, deploy step: every router replica's URL, or k8s://NAMESPACE/SERVICE[:PORT] "
        "for a Service's ready pods, found again on every tick (default: the InferenceService's transformer "
        "Service, or its predictor without serving.router, as k8s://)",
    )
    runtime_urls: list[str] = Field(
        default_factory=list,
        description="router mode, deploy step: every lorafleet runtime replica's URL (or k8s:// Service), "
        "where the candidate is loaded (default: the predictor Service's ready pods)",
    )

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if not v or any(b <= a for a, b in itertools.pairwise(v)) or v[-1] != 100 or v[0] <= 0:
            raise ValueError("steps must be increasing percentages in (0, 100], ending at 100")
        return v

    @model_validator(mode="after")
    def _mode(self) -> CanaryPolicy:
        if self.mode == "revision" and self.analysis.source != "prometheus":
            raise ValueError(
                "mode 'revision' needs analysis.source 'prometheus' (the router's metrics are per adapter)"
            )
        return self

    def queries(self) -> dict[str, str]:
        """The PromQL templates in force: the mode's defaults, then ``analysis.queries``."""
        defaults = REVISION_QUERIES if self.mode == "revision" else ROUTER_QUERIES
        return {**defaults, **self.analysis.queries}
