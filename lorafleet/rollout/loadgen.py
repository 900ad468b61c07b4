"""A bounded HTTP load generator for canary drills: real chat completions, closed loop.

``concurrency`` worker threads each send one request after another to an OpenAI-compatible
endpoint until :meth:`LoadGenerator.stop`, ``max_requests`` or ``max_seconds``, whichever
comes first. Every answer is kept with the adapter that served it (the router's
``x-lorafleet-adapter`` header), so a drill can check what each version answered.

It speaks raw HTTP (httpx) on purpose, not the project's OpenAI client
(:mod:`lorafleet.llm`): a load generator must see every status code and header as the
server sent it, and must not retry. A retried 429 or 503 would hide exactly the errors the
canary analysis counts, and would add load the drill did not ask for.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx

__all__ = ["LoadGenerator", "Outcome"]


@dataclass(frozen=True)
class Outcome:
    """One request: who answered, how, and how long it took (status 0: no answer)."""

    adapter: str | None
    status: int
    latency_s: float
    at: float


class LoadGenerator:
    """Closed-loop load on one model name.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8080`` (requests go to
            ``/openai/v1/chat/completions``).
        model: the ``model`` of every request (a route name for a canary).
        concurrency: worker threads, each with one request in flight.
        max_requests: stop after this many requests in all.
        max_seconds: stop after this long.
        max_tokens: completion budget per request (small: the drill measures serving).
        timeout_s: per request.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        concurrency: int = 4,
        max_requests: int = 20_000,
        max_seconds: float = 300.0,
        max_tokens: int = 4,
        timeout_s: float = 30.0,
    ) -> None:
        self.url = f"{base_url.rstrip('/')}/openai/v1/chat/completions"
        self.model = model
        self.concurrency = concurrency
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sent = 0

    def _take(self) -> bool:
        with self._lock:
            if self._sent >= self.max_requests:
                return False
            self._sent += 1
            return True

    def _worker(self, index: int, deadline: float) -> None:
        body = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "messages": [{"role": "user", "content": f"Write a short proposal, worker {index}."}],
        }
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set() and time.monotonic() < deadline and self._take():
                start = time.perf_counter()
                try:
                    response = client.post(self.url, json=body)
                    adapter, status = (
                        response.headers.get("x-lorafleet-adapter"),
                        response.status_code,
                    )
                except httpx.HTTPError:
                    adapter, status = None, 0
                outcome = Outcome(adapter, status, time.perf_counter() - start, time.time())
                with self._lock:
                    self.outcomes.append(outcome)

    def start(self) -> LoadGenerator:
        """Start the workers; returns ``self``."""
        deadline = time.monotonic() + self.max_seconds
        self._threads = [
            threading.Thread(
                target=self._worker, args=(i, deadline), name=f"loadgen-{i}", daemon=True
            )
            for i in range(self.concurrency)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[Outcome]:
        """Stop, wait for the requests in flight, and return every outcome."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + 5)
        with self._lock:
            return list(self.outcomes)

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def summary(self) -> dict[str, dict[str, int]]:
        """Answers per adapter and status, e.g. ``{"writer-v1": {"200": 310}}``."""
        with self._lock:
            counts = Counter((o.adapter or "none", str(o.status)) for o in self.outcomes)
        out: dict[str, dict[str, int]] = {}
        for (adapter, status), n in sorted(counts.items()):
            out.setdefault(adapter, {})[status] = n
        return out
