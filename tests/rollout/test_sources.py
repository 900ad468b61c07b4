"""Measurements: histogram quantiles, the router's exposition, deltas, and the Prometheus HTTP API."""

from __future__ import annotations

import math

import pytest
from prometheus_client import generate_latest

from lorafleet.fleet import CanaryPolicy
from lorafleet.rollout.controller import judge
from lorafleet.rollout.sources import (
    PrometheusSource,
    SourceError,
    counters_from_text,
    histogram_quantile,
    interval_text,
    measure_snapshots,
)
from lorafleet.rollout.state import Target
from lorafleet.serve.metrics import ServingMetrics

INF = math.inf


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    # rank 95 of 100 falls in (0.25, 0.5] which holds observations 91..100:
    # 0.25 + 0.25 * (95 - 90) / (100 - 90) = 0.375 (Prometheus' histogram_quantile formula)
    buckets = [(0.1, 50), (0.25, 90), (0.5, 100), (INF, 100)]
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.375)
    assert histogram_quantile(0.5, buckets) == pytest.approx(
        0.1
    )  # rank 50 is the first bucket's top
    # rank beyond the last finite bucket: the highest finite bound, as Prometheus answers
    assert histogram_quantile(0.95, [(0.1, 10), (INF, 100)]) == pytest.approx(0.1)
    assert histogram_quantile(0.95, [(0.1, 0), (INF, 0)]) is None
    assert histogram_quantile(0.95, []) is None


def _exposition(observations: list[tuple[str, str, int, float]]) -> str:
    metrics = ServingMetrics()
    for model, adapter, status, latency in observations:
        metrics.observe(model, adapter, status, latency)
    return generate_latest(metrics.registry).decode()


def test_router_exposition_counts_5xx_and_latency_per_version() -> None:
    text = _exposition(
        [("writer", "v1", 200, 0.02)] * 8
        + [("writer", "v2", 200, 0.6)] * 3
        + [("writer", "v2", 500, 0.01)] * 2
        + [("writer", "v2", 400, 0.01)]  # a client's mistake: not a canary error
        + [("other", "v2", 500, 0.01)] * 5  # another route: not counted
    )
    counters = counters_from_text(text, "writer", ["v1", "v2"], judge_metric=None)
    assert counters["v1"]["requests"] == 8 and counters["v1"]["errors"] == 0
    assert counters["v2"]["requests"] == 6 and counters["v2"]["errors"] == 2
    # a baseline of zero counters: every request since the replica started
    (m,) = measure_snapshots({"r": counters}, {"r": {}}, ["v2"])
    assert m.error_rate == pytest.approx(2 / 6)
    # 3 of 6 observations are 0.6 s: p95 lies in (0.5, 1]: 0.5 + 0.5 * (5.7 - 3) / 3 = 0.95 s
    assert m.p95_latency_ms == pytest.approx(950.0)


def test_a_replica_answering_404_for_the_canary_is_a_failure() -> None:
    # Given a replica that lacks the candidate: its share of the route's requests get 404
    text = _exposition(
        [("writer", "v1", 200, 0.02)] * 30
        + [("writer", "v2", 200, 0.02)] * 20
        + [("writer", "v2", 404, 0.01)] * 10
        + [("writer", "v2", 400, 0.01)] * 5  # a client's mistake still is not
    )
    # When the interval is measured and judged
    counters = counters_from_text(text, "writer", ["v1", "v2"], judge_metric=None)
    (stable, canary) = measure_snapshots({"r": counters}, {"r": {}}, ["v1", "v2"])
    verdict, reasons = judge(canary, CanaryPolicy.model_validate({"max_error_rate": 0.05}))
    # Then the 404s are the candidate's errors, and they fail it
    assert (stable.errors, canary.requests, canary.errors) == (0, 35, 10)
    assert verdict == "Failed" and any(r.startswith("error rate 28.6%") for r in reasons)


def test_delta_measures_the_interval_and_survives_a_counter_reset() -> None:
    before = counters_from_text(_exposition([("w", "v2", 200, 0.02)] * 10), "w", ["v2"], None)["v2"]
    after = counters_from_text(
        _exposition([("w", "v2", 200, 0.02)] * 10 + [("w", "v2", 503, 0.02)] * 5), "w", ["v2"], None
    )["v2"]
    (m,) = measure_snapshots({"r": {"v2": after}}, {"r": {"v2": before}}, ["v2"])
    assert (m.requests, m.errors, m.error_rate) == (5, 5, 1.0)
    # a replica restarted: its counters start again below the baseline, and count from zero
    restarted = counters_from_text(_exposition([("w", "v2", 200, 0.02)] * 3), "w", ["v2"], None)[
        "v2"
    ]
    (m,) = measure_snapshots({"r": {"v2": restarted}}, {"r": {"v2": after}}, ["v2"])
    assert (m.requests, m.errors) == (3, 0)
    assert m.p95_latency_ms is not None and m.p95_latency_ms <= 25


def test_judge_score_is_the_mean_over_the_interval() -> None:
    text = (
        "# TYPE lorafleet_judge_score histogram\n"
        'lorafleet_judge_score_bucket{model="w",adapter="v2",le="+Inf"} 4\n'
        'lorafleet_judge_score_count{model="w",adapter="v2"} 4\n'
        'lorafleet_judge_score_sum{model="w",adapter="v2"} 14\n'
    )
    now = counters_from_text(text, "w", ["v2"], "lorafleet_judge_score")["v2"]
    before = {**now, "judge_sum": 6.0, "judge_count": 2.0}
    (m,) = measure_snapshots({"r": {"v2": now}}, {"r": {"v2": before}}, ["v2"])
    assert (m.judge_score, m.judge_samples) == (4.0, 2.0)


def test_garbage_exposition_is_a_source_error() -> None:
    with pytest.raises(SourceError, match="not Prometheus text"):
        counters_from_text('lorafleet_requests_total{model="w" 1\n', "w", ["v"], None)


def test_prometheus_source_renders_templates_and_reads_vectors(prometheus) -> None:
    policy = CanaryPolicy.model_validate(
        {
            "analysis": {
                "source": "prometheus",
                "prometheus_url": prometheus.url,
                "interval_seconds": 12.5,
            }
        }
    )
    target = Target(
        route="writer", stable="v1", canary="v2", router_urls=["http://router"], namespace="fleet"
    )
    prometheus.set("v1", requests=100, error_rate=0.0, p95_latency_ms=80)
    prometheus.set("v2", requests=20, error_rate=0.1)  # no latency series: an empty vector
    stable, canary, baseline = PrometheusSource(policy).measure(target, policy, ("v1", "v2"), None)
    assert baseline is None
    assert (stable.requests, stable.error_rate, stable.p95_latency_ms) == (100, 0.0, 80)
    assert (canary.requests, canary.error_rate, canary.p95_latency_ms) == (20, 0.1, None)
    assert canary.errors == pytest.approx(2.0)
    # the templates were filled in: route, version and the interval as a PromQL duration
    assert any('model="writer",adapter="v2"' in q and "[13s]" in q for q in prometheus.queries)
    assert all("$" not in q for q in prometheus.queries)
    assert interval_text(0.2) == "1s"


def test_prometheus_errors_are_source_errors(prometheus) -> None:
    policy = CanaryPolicy.model_validate(
        {"analysis": {"source": "prometheus", "prometheus_url": prometheus.url}}
    )
    target = Target(route="w", stable="v1", canary="v2", router_urls=["http://router"])
    prometheus.fail = True
    with pytest.raises(SourceError, match="HTTP 503: down for the test"):
        PrometheusSource(policy).measure(target, policy, ("v1", "v2"), None)
    gone = CanaryPolicy.model_validate(
        {"analysis": {"source": "prometheus", "prometheus_url": "http://127.0.0.1:9"}}
    )
    with pytest.raises(SourceError, match="ConnectError"):
        PrometheusSource(gone).measure(target, gone, ("v1", "v2"), None)
