"""The metrics, their registry, and the /metrics route.

Counters and histograms are fed by ``enigma_request_finished`` events as
requests end; gauges are read from each served engine's ``stats()`` when
Prometheus scrapes. Names follow vLLM's, with an ``enigma:`` prefix. Other
plugins add metrics by registering them in prometheus_client's default
registry, which ``/metrics`` serves after these.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                   80.0, 160.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

_metrics: Metrics | None = None
_lock = threading.Lock()


def metrics() -> Metrics:
    """The process's metrics (created on first use)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = Metrics()
        return _metrics


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.contexts: list[Any] = []
        labels = ["model_name"]
        self.requests = Counter("enigma:request_success", "Requests finished, by finish reason.",
                                [*labels, "finished_reason"], registry=self.registry)
        self.prompt_tokens = Counter("enigma:prompt_tokens", "Prompt tokens processed.", labels,
                                     registry=self.registry)
        self.generation_tokens = Counter("enigma:generation_tokens", "Tokens generated.", labels,
                                         registry=self.registry)
        self.cached_prompt_tokens = Counter("enigma:prefix_cache_hits", "Prompt tokens served from the "
                                            "prefix cache.", labels, registry=self.registry)
        self.ttft = Histogram("enigma:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("enigma:inter_token_latency_seconds", "Mean time between a request's tokens.",
                             labels, buckets=TOKEN_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("enigma:e2e_request_latency_seconds", "Arrival to finish.", labels,
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(EngineCollector(self))

    def observe_finished(self, event: Any) -> None:
        model = event.model
        self.requests.labels(model, event.finish_reason).inc()
        self.prompt_tokens.labels(model).inc(event.prompt_tokens)
        self.generation_tokens.labels(model).inc(event.generation_tokens)
        self.cached_prompt_tokens.labels(model).inc(getattr(event, "cached_prompt_tokens", 0) or 0)
        if event.time_to_first_token is not None:
            self.ttft.labels(model).observe(event.time_to_first_token)
        if event.mean_inter_token_latency is not None:
            self.itl.labels(model).observe(event.mean_inter_token_latency)
        if event.e2e_latency is not None:
            self.e2e.labels(model).observe(event.e2e_latency)

    def render(self) -> bytes:
        """enigma's own metrics, then prometheus_client's default registry: the process collectors and
        what other plugins register there (the response cache's counters)."""
        from prometheus_client import REGISTRY, generate_latest

        return generate_latest(self.registry) + generate_latest(REGISTRY)


class EngineCollector:
    """Gauges read from each served engine at scrape time."""

    GAUGES = {
        "enigma:num_requests_running": ("running", "Requests in the running batch."),
        "enigma:num_requests_waiting": ("waiting", "Requests waiting to be scheduled."),
        "enigma:num_preemptions": ("preemptions_total", "Preemptions so far."),
        "enigma:kv_cache_blocks_used": ("kv_blocks_used", "KV-cache blocks in use."),
        "enigma:kv_cache_blocks_total": ("kv_blocks_total", "KV-cache blocks in the pool."),
        "enigma:prefix_cache_hit_rate": ("prefix_cache_hit_rate", "Share of prompt tokens found in the prefix "
                                                                   "cache."),
    }

    COUNTERS = {
        # vLLM's speculative-decoding counters (its v1 names), for engines that speculate
        "enigma:spec_decode_num_drafts": ("spec_decode_num_drafts", "Verifications of draft tokens."),
        "enigma:spec_decode_num_draft_tokens": ("spec_decode_num_draft_tokens", "Draft tokens proposed."),
        "enigma:spec_decode_num_accepted_tokens": ("spec_decode_num_accepted_tokens", "Draft tokens accepted."),
    }
    SPEC_GAUGES = {
        "enigma:spec_decode_draft_acceptance_rate": ("spec_decode_draft_acceptance_rate",
                                                     "Share of draft tokens accepted."),
        "enigma:spec_decode_mean_accepted_length": ("spec_decode_mean_accepted_length",
                                                    "Tokens emitted per verification (accepted drafts + 1)."),
    }

    def __init__(self, owner: Metrics) -> None:
        self.owner = owner

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families = {name: GaugeMetricFamily(name, doc, labels=["model_name"])
                    for name, (_, doc) in {**self.GAUGES, **self.SPEC_GAUGES}.items()}
        counters = {name: CounterMetricFamily(name, doc, labels=["model_name"])
                    for name, (_, doc) in self.COUNTERS.items()}
        per_position = CounterMetricFamily("enigma:spec_decode_num_accepted_tokens_per_pos",
                                           "Draft tokens accepted, by position in the draft.",
                                           labels=["model_name", "position"])
        usage = GaugeMetricFamily("enigma:kv_cache_usage_perc", "Share of KV-cache blocks in use (0-1).",
                                  labels=["model_name"])
        for context in self.owner.contexts:
            for model, stats in context.stats().items():
                if not stats:
                    continue
                for name, (key, _) in {**self.GAUGES, **self.SPEC_GAUGES}.items():
                    if key in stats:
                        families[name].add_metric([model], float(stats[key]))
                for name, (key, _) in self.COUNTERS.items():
                    if key in stats:
                        counters[name].add_metric([model], float(stats[key]))
                for key, value in stats.items():
                    if key.startswith("spec_decode_num_accepted_tokens_pos"):
                        position = key.removeprefix("spec_decode_num_accepted_tokens_pos")
                        per_position.add_metric([model, position], float(value))
                total = stats.get("kv_blocks_total") or 0
                usage.add_metric([model], stats.get("kv_blocks_used", 0) / total if total else 0.0)
        yield from families.values()
        yield usage
        yield from counters.values()
        yield per_position


class MetricsTransport:
    """Contributes GET /metrics."""

    def public_paths(self) -> list[str]:
        """/metrics needs no API key unless ``plugins.prometheus.auth`` says so."""
        from enigma.config import plugin_settings

        return [] if plugin_settings("prometheus").auth else ["/metrics"]

    def routes(self, context: Any) -> list[Any]:
        from starlette.responses import Response
        from starlette.routing import Route

        owner = metrics()
        if context is not None and context not in owner.contexts:
            owner.contexts.append(context)

        async def endpoint(request: Any) -> Any:
            from prometheus_client import CONTENT_TYPE_LATEST

            return Response(owner.render(), media_type=CONTENT_TYPE_LATEST)

        return [Route("/metrics", endpoint, methods=["GET"])]
