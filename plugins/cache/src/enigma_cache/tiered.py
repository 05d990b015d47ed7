"""Levels looked up in order, a hit filling the faster ones: the cache both the server and
:class:`~enigma_cache.InferenceCache` use."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from enigma_cache.codec import CorruptEntry
from enigma_cache.levels import LevelUnavailable
from enigma_cache.metrics import cache_metrics

logger = logging.getLogger("enigma.cache")


class TieredCache:
    """Framed values under string keys, in ``levels`` (fastest first).

    ``get`` asks each level in turn; a value that fails to decode is dropped
    from its level and the next one is asked; a hit is copied into the
    faster levels with the time it has left. ``set`` writes every level. A
    level that is down is skipped (and counted), never an error.
    """

    def __init__(self, levels: Sequence[Any]) -> None:
        if not levels:
            raise ValueError("a cache needs at least one level")
        self.levels = list(levels)
        self.metrics = cache_metrics()
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {"hits": 0, "misses": 0, "errors": 0, "corrupt": 0, "stored_bytes": 0}
        self.hits_by_level: dict[str, int] = {level.name: 0 for level in self.levels}
        for level in self.levels:
            self.metrics.up.labels(level.name).set(1)

    def _count(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self.counts[key] += amount

    def get(self, key: str, decode: Callable[[bytes], Any]) -> tuple[Any, str] | None:
        """The value under ``key`` and the level that had it, or None."""
        for position, level in enumerate(self.levels):
            try:
                found = level.get(key)
            except LevelUnavailable:
                self._error(level)
                continue
            if found is None:
                continue
            blob, expires_at = found
            try:
                value = decode(blob)
            except CorruptEntry as exc:
                logger.warning("dropped a corrupt cache entry in %s (%s)", level.name, exc)
                self._count("corrupt")
                self.metrics.corrupt.labels(level.name).inc()
                self._quietly(level.delete, key)
                continue
            for faster in self.levels[:position]:
                self._quietly(faster.set, key, blob, expires_at)
            with self._lock:
                self.counts["hits"] += 1
                self.hits_by_level[level.name] += 1
            return value, level.name
        self._count("misses")
        return None

    def set(self, key: str, blob: bytes, ttl: float | None) -> None:
        """Store ``blob`` (framed) for ``ttl`` seconds (None: until evicted) in every level."""
        expires_at = None if ttl is None else time.time() + ttl
        for level in self.levels:
            if self._quietly(level.set, key, blob, expires_at):
                self._count("stored_bytes", len(blob))
                self.metrics.stored_bytes.labels(level.name).inc(len(blob))

    def delete(self, key: str) -> None:
        for level in self.levels:
            self._quietly(level.delete, key)

    def clear(self, prefix: str = "") -> dict[str, int]:
        """Remove entries whose key starts with ``prefix`` (all with ""): how many, per level."""
        removed = {}
        for level in self.levels:
            try:
                removed[level.name] = level.clear(prefix)
            except LevelUnavailable:
                self._error(level)
                removed[level.name] = 0
        return removed

    def status(self) -> dict[str, Any]:
        """Each level's state, and ``ok`` or ``degraded`` (a level down) overall."""
        levels = {level.name: level.status() for level in self.levels}
        degraded = any(report.get("status") != "ok" for report in levels.values())
        return {"status": "degraded" if degraded else "ok", "levels": levels}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counts, "hits_by_level": dict(self.hits_by_level)}

    def close(self) -> None:
        for level in self.levels:
            close = getattr(level, "close", None)
            if close is not None:
                close()

    def _quietly(self, action: Callable[..., Any], *args: Any) -> bool:
        try:
            action(*args)
        except LevelUnavailable:
            self._error(getattr(action, "__self__", None))
            return False
        return True

    def _error(self, level: Any) -> None:
        self._count("errors")
        name = getattr(level, "name", "unknown")
        self.metrics.errors.labels(name).inc()


def level_watcher(name: str) -> Callable[[bool], None]:
    """A callback that sets ``name``'s up gauge (Redis calls it when it goes down and comes back)."""
    return lambda up: cache_metrics().up.labels(name).set(1 if up else 0)
