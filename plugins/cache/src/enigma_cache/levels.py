"""The places a cached value can live: process memory, a folder on disk, a Redis server.

Each level stores framed bytes (:mod:`enigma_cache.codec`) under a string
key with an absolute expiry time (seconds since the epoch, or None: until
evicted). Levels bound themselves: memory and disk by bytes, evicting the
least recently used entries; Redis by its own ``maxmemory`` policy. A level
that cannot be reached raises :class:`LevelUnavailable`; the tiered cache
then goes on without it.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from enigma.urls import redacted

logger = logging.getLogger("enigma.cache")

_ENTRY_OVERHEAD = 96
"""Bytes a memory entry costs beyond its key and value (tuple, dict slot, LRU links), roughly."""


class LevelUnavailable(Exception):
    """The level is down (Redis unreachable); the lookup or write goes on without it."""


class MemoryLevel:
    """An in-process LRU bounded by bytes (cachetools' ``TLRUCache``), with a TTL per entry."""

    name = "memory"

    def __init__(self, max_bytes: int) -> None:
        from cachetools import TLRUCache

        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: TLRUCache = TLRUCache(
            maxsize=max_bytes, ttu=lambda _key, value, _now: value[1] if value[1] is not None else float("inf"),
            timer=time.time, getsizeof=lambda value: value[2])

    def get(self, key: str) -> tuple[bytes, float | None] | None:
        with self._lock:
            entry = self._entries.get(key)
        return None if entry is None else (entry[0], entry[1])

    def set(self, key: str, blob: bytes, expires_at: float | None) -> None:
        size = len(blob) + len(key) + _ENTRY_OVERHEAD
        if size > self.max_bytes:
            return  # larger than the whole level: not kept here
        with self._lock:
            self._entries[key] = (blob, expires_at, size)

    def delete(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self, prefix: str = "") -> int:
        with self._lock:
            doomed = [key for key in list(self._entries.keys()) if key.startswith(prefix)]
            for key in doomed:
                self._entries.pop(key, None)
        return len(doomed)

    def status(self) -> dict[str, Any]:
        with self._lock:
            self._entries.expire()
            return {"status": "ok", "entries": len(self._entries), "bytes": int(self._entries.currsize),
                    "max_bytes": self.max_bytes}


class DiskLevel:
    """A folder of SQLite and files (diskcache), bounded by bytes with LRU eviction, shared by the
    processes of one machine."""

    name = "disk"

    def __init__(self, directory: Path, max_bytes: int) -> None:
        import diskcache

        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.max_bytes = max_bytes
        self._cache = diskcache.Cache(str(directory), size_limit=max_bytes,
                                      eviction_policy="least-recently-used", cull_limit=16)

    def _guard(self, action: Any) -> Any:
        import sqlite3

        try:
            return action()
        except (sqlite3.Error, OSError) as exc:
            logger.warning("response cache on disk at %s failed (%s: %s); going on without it for this request",
                           self.directory, type(exc).__name__, exc)
            raise LevelUnavailable(str(exc)) from exc

    def get(self, key: str) -> tuple[bytes, float | None] | None:
        found = self._guard(lambda: self._cache.get(key, default=None, expire_time=True))
        if found is None or found[0] is None:
            return None
        return found[0], found[1]

    def set(self, key: str, blob: bytes, expires_at: float | None) -> None:
        expire = None if expires_at is None else max(expires_at - time.time(), 0.001)
        self._guard(lambda: self._cache.set(key, bytes(blob), expire=expire))

    def delete(self, key: str) -> None:
        self._guard(lambda: self._cache.delete(key))

    def clear(self, prefix: str = "") -> int:
        def clear() -> int:
            if not prefix:
                return self._cache.clear()
            doomed = [key for key in self._cache.iterkeys() if isinstance(key, str) and key.startswith(prefix)]
            for key in doomed:
                self._cache.delete(key)
            return len(doomed)

        return self._guard(clear)

    def status(self) -> dict[str, Any]:
        try:
            return {"status": "ok", "entries": len(self._cache), "bytes": int(self._cache.volume()),
                    "max_bytes": self.max_bytes, "directory": str(self.directory)}
        except Exception as exc:
            return {"status": "down", "error": f"{type(exc).__name__}: {exc}", "directory": str(self.directory)}

    def close(self) -> None:
        self._cache.close()


class RedisLevel:
    """A Redis server (redis-py), shared by replicas. When it cannot be reached the level is marked
    down with one warning, skipped, and tried again every ``retry_s`` seconds; when it answers again it
    is used again, with no restart."""

    name = "redis"

    def __init__(self, url: str, *, timeout_s: float = 0.25, retry_s: float = 5.0,
                 on_change: Any = None) -> None:
        import redis

        self.url = url
        self.retry_s = retry_s
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
        self._lock = threading.Lock()
        self.down_since: float | None = None
        self.last_error = ""
        self._retry_at = 0.0
        self._on_change = on_change or (lambda up: None)

    def _call(self, action: Any) -> Any:
        now = time.time()
        if self.down_since is not None and now < self._retry_at:
            raise LevelUnavailable(self.last_error)
        try:
            result = action(self._client)
        except self._errors as exc:
            with self._lock:
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._retry_at = now + self.retry_s
                if self.down_since is None:
                    self.down_since = now
                    logger.warning("Redis at %s is unreachable (%s); serving without it, trying again every "
                                   "%g s", redacted(self.url), self.last_error, self.retry_s)
                    self._on_change(False)
            raise LevelUnavailable(self.last_error) from exc
        if self.down_since is not None:
            with self._lock:
                if self.down_since is not None:
                    logger.warning("Redis at %s answers again after %.1f s; using it again", redacted(self.url),
                                   now - self.down_since)
                    self.down_since = None
                    self._on_change(True)
        return result

    def get(self, key: str) -> tuple[bytes, float | None] | None:
        def get(client: Any) -> Any:
            pipe = client.pipeline(transaction=False)
            pipe.get(key)
            pipe.pttl(key)
            return pipe.execute()

        blob, pttl = self._call(get)
        if blob is None:
            return None
        return blob, (time.time() + pttl / 1000 if pttl and pttl > 0 else None)

    def set(self, key: str, blob: bytes, expires_at: float | None) -> None:
        if expires_at is None:
            self._call(lambda client: client.set(key, blob))
            return
        milliseconds = max(int((expires_at - time.time()) * 1000), 1)
        self._call(lambda client: client.set(key, blob, px=milliseconds))

    def delete(self, key: str) -> None:
        self._call(lambda client: client.delete(key))

    def clear(self, prefix: str = "") -> int:
        def clear(client: Any) -> int:
            removed = 0
            batch: list[bytes] = []
            for key in client.scan_iter(match=_glob_escape(prefix) + "*", count=500):
                batch.append(key)
                if len(batch) == 500:
                    removed += client.delete(*batch)
                    batch = []
            if batch:
                removed += client.delete(*batch)
            return removed

        return self._call(clear)

    def status(self) -> dict[str, Any]:
        if self.down_since is not None:
            return {"status": "down", "url": redacted(self.url), "error": self.last_error,
                    "down_since": round(self.down_since, 3), "retry_s": self.retry_s}
        return {"status": "ok", "url": redacted(self.url)}

    def close(self) -> None:
        self._client.close()


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
