"""Prometheus metrics of every service, at `GET /metrics` (the text format; behind the API key).

Each app has a registry of its own (`ServiceMetrics`), so two apps in one process never share a
counter. prometheus_client's counters and histograms take a lock per update, so under gunicorn's
threads (one worker, many threads) no update is lost or counted twice: the numbers are exact.

- Every service: `parley:http_requests_total{method, route, status}` (route: the Flask rule, such as
  `/api/dialogs/<dialog_id>`, never the raw path, so an id does not make a new series),
  `parley:http_request_duration_seconds{method, route}` (until the response starts), and the
  process' own (`process_*`, `python_*`).
- LLM services (`LLMMetrics`): vLLM's metrics with the `parley:` prefix, their buckets and the
  `model_name` label, so dashboards made for vLLM carry over:
  `time_to_first_token_seconds`, `inter_token_latency_seconds`, `e2e_request_latency_seconds`,
  `request_queue_time_seconds` (histograms, per sequence); `num_requests_running`,
  `num_requests_waiting`, `kv_cache_usage_perc` (gauges, read from the engine when scraped);
  `prompt_tokens_total` (a prompt once, however many sequences it asks for, as `usage.prompt_tokens`),
  `generation_tokens_total` (the tokens served), `prefix_cache_queries_total` and
  `prefix_cache_hits_total` (prompt tokens looked up in / copied from the prefix cache, per sequence),
  `request_success_total{finished_reason}` (per sequence: stop, length, or abort when the client left).
- The agent (`AgentMetrics`): `parley:skill_hypothesis_latency_seconds{skill}`,
  `parley:skills_skipped_total{skill, reason}`, `parley:turns_total{active_skill}`,
  `parley:turn_latency_seconds`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

from flask import Flask, Response, g, request
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

PREFIX = "parley:"
METRICS_ROUTE = "/metrics"
# Prometheus' classic text format, which every Prometheus version reads (`parley:` names are classic names).
UNMATCHED_ROUTE = "(unmatched)"
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# vLLM's buckets (vllm/v1/metrics/loggers.py), so its dashboards' quantiles read the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                       20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISHED_REASONS = ("stop", "length", "abort")


class ServiceMetrics:
    """A service's registry, with the HTTP metrics every service has."""

    def __init__(self) -> None:
        disable_created_metrics()  # no `_created` series beside each counter: only what dashboards read
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.http_requests = Counter(
            PREFIX + "http_requests", "HTTP requests answered, by route (the Flask rule) and status.",
            ["method", "route", "status"], registry=self.registry,
        )
        self.http_duration = Histogram(
            PREFIX + "http_request_duration_seconds", "Time from a request's arrival to its response's start.",
            ["method", "route"], buckets=HTTP_BUCKETS, registry=self.registry,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def init_metrics(app: Flask, metrics: ServiceMetrics) -> None:
    """Count every request of `app` and serve `GET /metrics`."""
    app.extensions["metrics"] = metrics

    @app.before_request
    def start_timer() -> None:
        g.parley_request_started = time.perf_counter()

    @app.after_request
    def count_request(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else UNMATCHED_ROUTE
        started = g.get("parley_request_started")
        if started is not None:
            metrics.http_duration.labels(request.method, route).observe(time.perf_counter() - started)
        metrics.http_requests.labels(request.method, route, str(response.status_code)).inc()
        return response

    @app.get(METRICS_ROUTE)
    def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), content_type=CONTENT_TYPE_PLAIN_0_0_4)


# --- LLM services ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineLoad:
    """What the gauges read from an engine when Prometheus scrapes: cheap to compute at any time."""

    running: int  # sequences in the batch
    waiting: int  # sequences queued for a batch slot
    kv_cache_usage: float  # KV positions in use / positions the batch slots hold, 0..1


class _EngineGauges(Collector):
    """The engine's gauges, read at scrape time (no thread keeps them up to date)."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.load: Callable[[], EngineLoad] | None = None

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families(None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families(self.load() if self.load is not None else None)

    def _families(self, load: EngineLoad | None) -> Iterator[GaugeMetricFamily]:
        values = {
            "num_requests_running": ("Sequences in the model's batch.", load.running if load else 0),
            "num_requests_waiting": ("Sequences waiting for a batch slot.", load.waiting if load else 0),
            "kv_cache_usage_perc": ("KV-cache usage. 1 means 100 percent usage.", load.kv_cache_usage if load else 0.0),
        }
        for name, (documentation, value) in values.items():
            family = GaugeMetricFamily(PREFIX + name, documentation, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family


class LLMMetrics:
    """vLLM's request and engine metrics for one served model (see the module docstring)."""

    def __init__(self, service: ServiceMetrics, model_name: str):
        registry, labels = service.registry, ["model_name"]
        self.model_name = model_name

        def histogram(name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, documentation, labels, buckets=buckets, registry=registry).labels(model_name)

        def counter(name: str, documentation: str) -> Counter:
            return Counter(PREFIX + name, documentation, labels, registry=registry).labels(model_name)

        self.time_to_first_token = histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", INTER_TOKEN_BUCKETS)
        self.e2e_latency = histogram("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Number of generation tokens processed.")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
        success = Counter(PREFIX + "request_success", "Count of successfully processed requests.",
                          ["model_name", "finished_reason"], registry=registry)
        self.request_success = {reason: success.labels(model_name, reason) for reason in FINISHED_REASONS}
        self._gauges = _EngineGauges(model_name)
        registry.register(self._gauges)

    def read_engine_load(self, load: Callable[[], EngineLoad]) -> None:
        """Where the gauges read from once the model is loaded (0 before)."""
        self._gauges.load = load

    def prompt_submitted(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def sequence(self, submitted_at: float) -> "SequenceTimer":
        return SequenceTimer(self, submitted_at)


class SequenceTimer:
    """One generated sequence as its reader sees it: time to its first token, between tokens, to its end."""

    __slots__ = ("metrics", "submitted_at", "last_token_at", "tokens", "finished")

    def __init__(self, metrics: LLMMetrics, submitted_at: float):
        self.metrics = metrics
        self.submitted_at = submitted_at
        self.last_token_at: float | None = None
        self.tokens = 0
        self.finished = False

    def token(self) -> None:
        now = time.monotonic()
        if self.last_token_at is None:
            self.metrics.time_to_first_token.observe(now - self.submitted_at)
        else:
            self.metrics.inter_token_latency.observe(now - self.last_token_at)
        self.last_token_at = now
        self.tokens += 1

    def finish(self, reason: str, *, admitted_at: float | None = None, prompt_tokens: int = 0,
               cached_prompt_tokens: int = 0) -> None:
        """The sequence ended (`reason`: stop, length or abort); recorded once however often it is called."""
        if self.finished:
            return
        self.finished = True
        metrics = self.metrics
        metrics.e2e_latency.observe(time.monotonic() - self.submitted_at)
        if admitted_at is not None:
            metrics.queue_time.observe(max(0.0, admitted_at - self.submitted_at))
            metrics.prefix_cache_queries.inc(prompt_tokens)
            metrics.prefix_cache_hits.inc(cached_prompt_tokens)
        metrics.generation_tokens.inc(self.tokens)
        metrics.request_success[reason].inc()


# --- the agent ---------------------------------------------------------------------------------


class AgentMetrics:
    """What a turn did: each skill's latency, the services skipped and why, the skill that answered."""

    def __init__(self, service: ServiceMetrics):
        registry = service.registry
        self.skill_latency = Histogram(
            PREFIX + "skill_hypothesis_latency_seconds", "Time from calling a skill to its usable answer.",
            ["skill"], buckets=HTTP_BUCKETS, registry=registry,
        )
        self.skipped = Counter(
            PREFIX + "skills_skipped", "Skills skipped in a turn, by reason (timeout, failed, bad answer, "
            "required service failed, not selected, turn time limit).",
            ["skill", "reason"], registry=registry,
        )
        self.turns = Counter(PREFIX + "turns", "Turns answered, by the skill whose answer the user got.",
                             ["active_skill"], registry=registry)
        self.turn_latency = Histogram(PREFIX + "turn_latency_seconds", "Time to answer a turn.",
                                      buckets=HTTP_BUCKETS, registry=registry)

    def skill_answered(self, skill: str, seconds: float) -> None:
        self.skill_latency.labels(skill).observe(seconds)

    def service_skipped(self, skill: str, reason: str) -> None:
        self.skipped.labels(skill, reason).inc()

    def turn_answered(self, active_skill: str, seconds: float) -> None:
        self.turns.labels(active_skill).inc()
        self.turn_latency.observe(seconds)
