"""Measurements for a rollout's analysis: from the router's ``/metrics`` or from Prometheus.

:class:`RouterSource` scrapes every router replica's Prometheus text exposition, keeps the
counters of the two versions of one route (requests, failed answers, latency histogram
buckets, and an online judge's score sum and count when there is one), and measures an
interval as the difference between two scrapes: the previous scrape is the *baseline*
stored in the rollout state, so a restarted controller measures from where the last one
stopped. A counter that went down (a replica restarted) counts from zero; a replica that
was not in the baseline (a Service's new endpoint) counts from the next scrape. p95 is
interpolated inside the histogram bucket that holds it, as Prometheus'
``histogram_quantile`` does.

:class:`PrometheusSource` renders the policy's PromQL templates (``$route``, ``$version``,
``$namespace``, ``$interval``) and reads instant vectors from ``/api/v1/query``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from string import Template
from typing import Any

import httpx

from lorafleet.errors import LorafleetError
from lorafleet.fleet import CanaryPolicy
from lorafleet.rollout.state import Measurement, Target

__all__ = [
    "PrometheusSource",
    "RouterSource",
    "SourceError",
    "counters_from_text",
    "histogram_quantile",
    "interval_text",
    "is_failure",
    "measure_snapshots",
]

REQUESTS = "lorafleet_requests_total"
LATENCY_BUCKET = "lorafleet_request_latency_seconds_bucket"


def is_failure(status: str) -> bool:
    """Whether an answer of this HTTP status counts against the version that gave it: a 5xx,
    or a 404 (the version is missing on the replica that got the request; the route exists,
    so it is no client's mistake). Other 4xx are the client's own mistakes."""
    return status.startswith("5") or status == "404"


class SourceError(LorafleetError):
    """The metrics could not be read (source down, bad answer); the analysis is an Error."""


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a cumulative histogram, as Prometheus computes it.

    Args:
        q: the quantile, in [0, 1].
        buckets: ``(upper_bound, cumulative_count)`` pairs, any order; ``inf`` for ``+Inf``.

    Returns:
        The estimate (linear inside the bucket holding rank ``q x total``; the highest
        finite bound when that is the ``+Inf`` bucket), or ``None`` with no observations.
    """
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in ordered:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def counters_from_text(
    text: str, route: str, versions: Sequence[str], judge_metric: str | None
) -> dict:
    """The counters of ``versions`` of ``route`` in one Prometheus text exposition.

    Returns:
        ``{version: {"requests", "errors", "buckets": {le: count}, "judge_sum", "judge_count"}}``
        (plain JSON data: it is stored as the next analysis' baseline).
    """
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, Any]] = {v: _empty() for v in versions}
    judge = (
        {f"{judge_metric}_sum": "judge_sum", f"{judge_metric}_count": "judge_count"}
        if judge_metric
        else {}
    )
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as exc:
        raise SourceError(f"metrics: not Prometheus text: {exc}") from None
    for family in families:
        for sample in family.samples:
            labels = sample.labels
            if labels.get("model") != route or labels.get("adapter") not in out:
                continue
            slot = out[labels["adapter"]]
            if sample.name == REQUESTS:
                slot["requests"] += sample.value
                if is_failure(labels.get("status", "")):
                    slot["errors"] += sample.value
            elif sample.name == LATENCY_BUCKET:
                slot["buckets"][labels["le"]] = (
                    slot["buckets"].get(labels["le"], 0.0) + sample.value
                )
            elif sample.name in judge:
                slot[judge[sample.name]] += sample.value
    return out


def _since(now: float, before: float) -> float:
    return now - before if now >= before else now  # a reset counter counts from zero


def _empty() -> dict[str, Any]:
    return {"requests": 0.0, "errors": 0.0, "buckets": {}, "judge_sum": 0.0, "judge_count": 0.0}


def _delta(now: Mapping[str, Any], before: Mapping[str, Any] | None) -> dict[str, Any]:
    """What one replica counted between two scrapes (a reset counter counts from zero)."""
    before = before or _empty()
    old = before["buckets"]
    reset = any(now["buckets"].get(le, 0.0) < count for le, count in old.items())
    judge_reset = now["judge_count"] < before["judge_count"]
    return {
        "requests": _since(now["requests"], before["requests"]),
        "errors": _since(now["errors"], before["errors"]),
        "buckets": {
            le: count - (0.0 if reset else old.get(le, 0.0)) for le, count in now["buckets"].items()
        },
        "judge_sum": now["judge_sum"] - (0.0 if judge_reset else before["judge_sum"]),
        "judge_count": _since(now["judge_count"], before["judge_count"]),
    }


def _sum(parts: list[dict[str, Any]]) -> dict[str, Any]:
    total = _empty()
    for part in parts:
        for key in ("requests", "errors", "judge_sum", "judge_count"):
            total[key] += part[key]
        for le, count in part["buckets"].items():
            total["buckets"][le] = total["buckets"].get(le, 0.0) + count
    return total


def _measurement(version: str, interval: Mapping[str, Any]) -> Measurement:
    requests, errors, judged = interval["requests"], interval["errors"], interval["judge_count"]
    p95 = histogram_quantile(
        0.95, [(float(le), count) for le, count in interval["buckets"].items()]
    )
    return Measurement(
        version=version,
        requests=requests,
        errors=errors,
        error_rate=errors / requests if requests > 0 else None,
        p95_latency_ms=None if p95 is None else round(p95 * 1000, 1),
        judge_score=interval["judge_sum"] / judged if judged > 0 else None,
        judge_samples=judged,
    )


def measure_snapshots(
    now: Mapping[str, Mapping[str, Any]],
    baseline: Mapping[str, Mapping[str, Any]] | None,
    versions: Sequence[str],
) -> list[Measurement]:
    """Each version's :class:`Measurement` between two snapshots ``{replica: {version:
    counters}}`` (:func:`counters_from_text` per replica).

    Deltas are taken per replica, then summed: a restarted replica counts from zero without
    hiding the others. Only replicas in both snapshots count: one that joined (or came back)
    has counters over an unknown span, maybe hours or earlier steps, which must not be judged
    as this interval; it counts from the next one.
    """
    baseline = baseline or {}
    return [
        _measurement(
            v, _sum([_delta(now[url][v], baseline[url].get(v)) for url in now if url in baseline])
        )
        for v in versions
    ]


class RouterSource:
    """Scrape ``/metrics`` of every router replica and measure the interval since the baseline.

    Args:
        policy: the rollout's policy (judge metric name).
        timeout_s: per scrape.
    """

    needs_baseline = True

    def __init__(self, policy: CanaryPolicy, timeout_s: float = 10.0) -> None:
        judge = policy.analysis.judge
        self.judge_metric = judge.metric if judge else None
        self.timeout_s = timeout_s

    def snapshot(self, target: Target, versions: tuple[str, str]) -> dict:
        """Counters per replica URL: ``{url: {version: counters}}``.

        Raises:
            SourceError: if a replica cannot be scraped.
        """
        out = {}
        with httpx.Client(timeout=self.timeout_s) as client:
            for url in target.router_urls:
                try:
                    response = client.get(f"{url.rstrip('/')}/metrics")
                except httpx.HTTPError as exc:
                    raise SourceError(f"{url}/metrics: {type(exc).__name__}: {exc}") from None
                if response.status_code != 200:
                    raise SourceError(f"{url}/metrics: HTTP {response.status_code}")
                out[url] = counters_from_text(
                    response.text, target.route, versions, self.judge_metric
                )
        return out

    def measure(
        self, target: Target, policy: CanaryPolicy, versions: tuple[str, str], baseline: dict | None
    ) -> tuple[Measurement, Measurement, dict]:
        """(stable, canary) over the interval since ``baseline``, and the new baseline.

        The replicas are ``target.router_urls`` now; they may differ from the baseline's
        (a Service's endpoints come and go): one that left is not scraped and its baseline
        is dropped; see :func:`measure_snapshots` for the rest.
        """
        now = self.snapshot(target, versions)
        stable, canary = measure_snapshots(now, baseline, versions)
        return stable, canary, now


def interval_text(seconds: float) -> str:
    """A PromQL range duration for an interval, whole seconds, at least 1s."""
    return f"{max(1, math.ceil(seconds))}s"


class PrometheusSource:
    """Run the policy's PromQL templates against Prometheus' HTTP API.

    Args:
        policy: the rollout's policy (``analysis.prometheus_url``, the templates).
        timeout_s: per query.
    """

    needs_baseline = False

    def __init__(self, policy: CanaryPolicy, timeout_s: float = 10.0) -> None:
        self.url = policy.analysis.prometheus_url.rstrip("/")
        self.timeout_s = timeout_s

    def query(self, client: httpx.Client, promql: str) -> float | None:
        """One instant query's value (``None`` for an empty vector or NaN).

        Raises:
            SourceError: if Prometheus cannot be reached or answers an error.
        """
        try:
            response = client.get(f"{self.url}/api/v1/query", params={"query": promql})
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise SourceError(f"{self.url}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200 or body.get("status") != "success":
            raise SourceError(
                f"{self.url}: HTTP {response.status_code}: {body.get('error') or body.get('status')} ({promql})"
            )
        data = body.get("data") or {}
        result = data.get("result")
        if data.get("resultType") == "scalar":
            value = result[1]
        elif data.get("resultType") == "vector":
            if not result:
                return None
            value = result[0]["value"][1]
        else:
            raise SourceError(
                f"{self.url}: expected a vector or scalar, got {data.get('resultType')!r} ({promql})"
            )
        number = float(value)
        return None if math.isnan(number) or math.isinf(number) else number

    def snapshot(self, target: Target, versions: tuple[str, str]) -> None:
        """Prometheus keeps the history itself: no baseline."""
        return None

    def measure(
        self, target: Target, policy: CanaryPolicy, versions: tuple[str, str], baseline: dict | None
    ) -> tuple[Measurement, Measurement, None]:
        """(stable, canary) over the last ``interval_seconds``."""
        queries = policy.queries()
        judge = policy.analysis.judge
        out = []
        with httpx.Client(timeout=self.timeout_s) as client:
            for version in versions:
                fill = {
                    "route": target.route,
                    "version": version,
                    "namespace": target.namespace,
                    "interval": interval_text(policy.analysis.interval_seconds),
                }
                values = {
                    k: self.query(client, Template(q).safe_substitute(fill))
                    for k, q in queries.items()
                }
                score = (
                    self.query(client, Template(judge.query).safe_substitute(fill))
                    if judge and judge.query
                    else None
                )
                requests = values["requests"] or 0.0
                rate = values["error_rate"]
                out.append(
                    Measurement(
                        version=version,
                        requests=requests,
                        errors=None if rate is None else round(rate * requests, 3),
                        error_rate=rate,
                        p95_latency_ms=values["p95_latency_ms"],
                        judge_score=score,
                        judge_samples=None,
                    )
                )
        return out[0], out[1], None
