"""Prometheus metrics: counted from every request's final event, read at scrape time for the
rest (queue, slots, links, spool), in a registry of the daemon's own.

The names follow Prometheus' conventions (a `_total` counter, `_seconds` and `_bytes` units);
docs/http.md lists each. Nothing here waits on the inference thread: a scrape reads counters
and plain attributes only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgeagent.protocol import Event

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# First tokens come in a few hundred ms on a small box, whole answers in seconds; the cloud's
# and a queue's waits reach minutes.
TTFT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
TOTAL_BUCKETS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0)
# Label values come from edgeagent's own vocabulary, never from what a client sent; anything
# else is counted as "other", so a label's values stay few.
OUTCOMES = {"local", "cloud", "queued", "kb", "bad_request", "busy", "too_long", "timeout",
            "cancelled", "internal", "cloud_error", "incomplete", "invalid",
            "not_covered"}  # fmt: skip
CACHE_KINDS = {"none", "slot", "copied", "session", "ram", "prefix-computed", "prefix-disk"}
ESCALATION_STATUSES = {"answered", "queued", "offline", "timeout", "refused", "error",
                       "cloud_error", "invalid"}  # fmt: skip


def _known(value: Any, known: set[str]) -> str:
    return value if isinstance(value, str) and value in known else "other"


class _Gauges(Collector):
    """Gauges read from the daemon at each scrape (`read` returns name -> (help, value))."""

    def __init__(self, read: Callable[[], dict[str, tuple[str, float]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        for name, (text, value) in self._read().items():
            yield GaugeMetricFamily(name, text, value=value)


class Metrics:
    def __init__(self, gauges: Callable[[], dict[str, tuple[str, float]]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "edgeagent_requests", "Requests finished, by front end and outcome (the answer's "
            "source, or the error code)", ["front_end", "outcome"], registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "edgeagent_time_to_first_token_seconds", "From a request's arrival to its first "
            "token, local answers", buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "edgeagent_request_duration_seconds", "From a request's arrival to its answer's "
            "end, by source", ["source"], buckets=TOTAL_BUCKETS, registry=r,
        )  # fmt: skip
        self.generated = Counter(
            "edgeagent_generated_tokens", "Tokens the local model generated", registry=r
        )
        self.prompt = Counter(
            "edgeagent_prompt_tokens", "Prompt tokens of local answers", registry=r
        )
        self.evaluated = Counter(
            "edgeagent_prompt_tokens_evaluated", "Prompt tokens the local model computed (the "
            "rest came from its caches)", registry=r,
        )  # fmt: skip
        self.cache = Counter(
            "edgeagent_prompt_cache_requests", "Local answers by where their prompt's cells "
            "came from", ["kind"], registry=r,
        )  # fmt: skip
        self.escalations = Counter(
            "edgeagent_escalations", "Escalated requests by what became of them when answered",
            ["status"], registry=r,
        )  # fmt: skip
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        r.register(_Gauges(gauges))

    def record(self, event: Event, front_end: str) -> None:
        """Count one request's final event."""
        if event.get("event") == "error":
            self.requests.labels(front_end, _known(event.get("code"), OUTCOMES)).inc()
            return
        source = _known(event.get("source"), OUTCOMES)
        self.requests.labels(front_end, source).inc()
        timings = event.get("timings") or {}
        if isinstance(timings.get("total_ms"), (int, float)):
            self.duration.labels(source).observe(timings["total_ms"] / 1000)
        escalation = event.get("escalation")
        if isinstance(escalation, dict):
            self.escalations.labels(_known(escalation.get("status"), ESCALATION_STATUSES)).inc()
        if source != "local":
            return
        if isinstance(timings.get("ttft_ms"), (int, float)):
            self.ttft.observe(timings["ttft_ms"] / 1000)
        usage = event.get("usage") or {}
        self.generated.inc(usage.get("completion_tokens", 0))
        self.prompt.inc(usage.get("prompt_tokens", 0))
        self.evaluated.inc(usage.get("evaluated_tokens", 0))
        self.cache.labels(_known(usage.get("cache"), CACHE_KINDS)).inc()

    def scrape(self) -> bytes:
        return generate_latest(self.registry)
