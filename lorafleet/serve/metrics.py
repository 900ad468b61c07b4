"""Prometheus metrics of the serving stack, labelled by public model name and adapter version.

The runtime registers them in prometheus-client's default registry, which KServe's own
``/metrics`` already exposes; the standalone router proxy keeps its own registry and
serves it itself. A canary controller compares the candidate and production versions on
``lorafleet_requests_total`` / ``lorafleet_request_errors_total`` and
``lorafleet_request_latency_seconds``. The runtime also observes each request's time to
first token (``lorafleet_time_to_first_token_seconds``, by adapter).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["UNKNOWN_MODEL", "ServingMetrics"]

# The model and adapter labels of a request for a model nobody serves: any client can send
# any string, and each new label value would be a new series kept forever.
UNKNOWN_MODEL = "_unknown"

# Seconds: a short completion on a tiny CPU model up to a long one on a loaded GPU.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Seconds: one prefill chunk on an idle runtime up to a long wait in a full queue.
FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServingMetrics:
    """Counters and histograms per (model, adapter) pair.

    ``model`` is the name the client asked for (a route or an adapter), ``adapter`` the
    version that answered. A request for a model that is not served is labelled
    :data:`UNKNOWN_MODEL` on both, so labels stay bounded by what is actually served. The
    time to first token is labelled by ``adapter`` only: the runtime observes it, and
    routes are the HTTP layer's.

    Args:
        registry: where the metrics live; a fresh one when ``None``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = ["model", "adapter"]
        self.requests = Counter(
            "lorafleet_requests",
            "Completion requests answered, by HTTP status.",
            [*labels, "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "lorafleet_request_errors",
            "Completion requests that did not get a 2xx answer.",
            [*labels, "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lorafleet_request_latency_seconds",
            "Time from request to last byte.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens_in = Counter(
            "lorafleet_prompt_tokens", "Prompt tokens processed.", labels, registry=self.registry
        )
        self.tokens_out = Counter(
            "lorafleet_completion_tokens",
            "Completion tokens generated.",
            labels,
            registry=self.registry,
        )
        self.rejections = Counter(
            "lorafleet_auth_rejections",
            "OpenAI requests turned away before routing, by reason "
            "(missing_key, invalid_key, rate_limited).",
            ["reason"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "lorafleet_queue_depth",
            "Requests waiting to join the running batch.",
            registry=self.registry,
        )
        self.first_token = Histogram(
            "lorafleet_time_to_first_token_seconds",
            "Time from a request's arrival in the runtime's queue to its first generated token.",
            ["adapter"],
            buckets=FIRST_TOKEN_BUCKETS,
            registry=self.registry,
        )

    def track_queue(self, depth: Callable[[], float]) -> None:
        """Report ``depth()`` as the queue depth whenever metrics are scraped."""
        self.queue_depth.set_function(depth)

    def observe_first_token(self, adapter: str, seconds: float) -> None:
        """Record one request's time to first token (``adapter``: the served name that ran it)."""
        self.first_token.labels(adapter).observe(seconds)

    def reject(self, reason: str) -> None:
        """Count one request refused by the API key check (the reason, never the key)."""
        self.rejections.labels(reason).inc()

    def observe(
        self,
        model: str,
        adapter: str,
        status: int,
        latency_s: float,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        """Record one answered request."""
        self.requests.labels(model, adapter, str(status)).inc()
        if status >= 300:
            self.errors.labels(model, adapter, str(status)).inc()
        self.latency.labels(model, adapter).observe(latency_s)
        self.tokens_in.labels(model, adapter).inc(prompt_tokens)
        self.tokens_out.labels(model, adapter).inc(completion_tokens)
