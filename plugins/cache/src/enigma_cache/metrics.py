"""The cache's Prometheus metrics, in prometheus_client's default registry (``/metrics`` serves it)."""

from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()
_metrics: CacheMetrics | None = None


class CacheMetrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        self.hits = Counter("enigma:response_cache_hits", "Lookups answered from the cache, by level "
                            "(memory, disk, redis; semantic for a similar prompt).", ["level"])
        self.misses = Counter("enigma:response_cache_misses", "Cacheable lookups that found nothing.")
        self.bypassed = Counter("enigma:response_cache_bypassed", "Requests that skipped the cache, by reason "
                                "(sampled, no-cache, no-store, opted-out, logprobs).", ["reason"])
        self.stored_bytes = Counter("enigma:response_cache_stored_bytes", "Bytes written to the cache, by level.",
                                    ["level"])
        self.errors = Counter("enigma:response_cache_errors", "Operations a level could not do (unreachable, "
                              "failing), by level.", ["level"])
        self.corrupt = Counter("enigma:response_cache_corrupt_entries", "Entries dropped because they could not "
                               "be read back, by level.", ["level"])
        self.up = Gauge("enigma:response_cache_level_up", "1 while a level answers, 0 while it is down.", ["level"])
        self.bytes = Gauge("enigma:response_cache_bytes", "Bytes held, by level (memory, disk).", ["level"])


def cache_metrics() -> CacheMetrics:
    """The process's cache metrics (created on first use)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = CacheMetrics()
        return _metrics


def watch_bytes(level: Any) -> None:
    """Report ``level``'s bytes at scrape time."""
    cache_metrics().bytes.labels(level.name).set_function(lambda: float(level.status().get("bytes", 0)))
