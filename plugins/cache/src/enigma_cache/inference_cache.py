"""``InferenceCache``: the seed's cache for any Python function, over the same levels as the server's."""

from __future__ import annotations

import functools
import hashlib
import inspect
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from enigma.errors import BadRequestError
from enigma_cache.building import build_levels, parse_levels
from enigma_cache.codec import decode_pickle, encode_pickle
from enigma_cache.tiered import TieredCache

F = TypeVar("F", bound=Callable[..., Any])
_MISSING = object()


class InferenceCache:
    """A key-value cache in memory, on disk and/or in Redis, with a TTL per entry.

    ``backend`` names the levels, fastest first: ``"memory"`` (an LRU bounded by
    ``max_memory_mb``), ``"disk"`` (``directory``, default the user cache dir,
    bounded by ``max_disk_mb``), ``"redis"`` (``url``, or ``host``/``port``/
    ``db``/``password``), or several (``"memory,redis"``, ``["memory", "disk"]``):
    a hit in a slower level fills the faster ones. Values are pickled, as
    diskcache and functools-style caches do, so share a Redis only with
    processes you trust. ``namespace`` keeps caches sharing a store apart.

    >>> cache = InferenceCache(backend="memory")
    >>> @cache.cached(ttl=3600)
    ... def answer(question): ...
    """

    def __init__(self, backend: str | Sequence[str] = "memory", *, host: str = "localhost", port: int = 6379,
                 db: int = 0, password: str | None = None, url: str | None = None,
                 directory: str | Path | None = None, max_memory_mb: float = 256, max_disk_mb: float = 1024,
                 ttl: float | None = 3600, namespace: str = "default", retry_s: float = 5.0) -> None:
        names = parse_levels(backend)
        if ttl is not None and ttl <= 0:
            raise BadRequestError(f"ttl must be a positive number of seconds or None (no expiry); got {ttl!r}")
        if url is None and "redis" in names:
            auth = f":{password}@" if password else ""
            url = f"redis://{auth}{host}:{port}/{db}"
        self.ttl = ttl
        self.namespace = namespace
        self._prefix = f"enigma:py:{namespace}:"
        self._cache = TieredCache(build_levels(
            names, memory_bytes=int(max_memory_mb * 2**20), disk_bytes=int(max_disk_mb * 2**20),
            disk_directory=Path(directory) if directory is not None else None, redis_url=url, redis_retry_s=retry_s))

    # ------------------------------------------------------------ mapping

    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default`` when there is none (or it expired)."""
        found = self._cache.get(self._prefix + _check_key(key), decode_pickle)
        return default if found is None else found[0]

    def set(self, key: str, value: Any, ttl: float | object | None = _MISSING) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (the cache's default when not given; None: no
        expiry)."""
        self._cache.set(self._prefix + _check_key(key), encode_pickle(value),
                        self.ttl if ttl is _MISSING else ttl)  # type: ignore[arg-type]

    def delete(self, key: str) -> None:
        self._cache.delete(self._prefix + _check_key(key))

    def clear(self) -> dict[str, int]:
        """Remove this namespace's entries from every level: how many, per level."""
        return self._cache.clear(self._prefix)

    def __contains__(self, key: str) -> bool:
        return self.get(key, _MISSING) is not _MISSING

    def stats(self) -> dict[str, Any]:
        """Hits (per level), misses, errors, corrupt entries dropped, bytes stored."""
        return self._cache.stats()

    def status(self) -> dict[str, Any]:
        """Each level's state: ``ok``, or ``down`` with the error (Redis unreachable)."""
        return self._cache.status()

    def close(self) -> None:
        self._cache.close()

    def __enter__(self) -> InferenceCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ decorator

    def cached(self, ttl: float | object | None = _MISSING,
               key: Callable[..., str] | None = None) -> Callable[[F], F]:
        """Cache a function's results by its arguments (pickled and hashed; or ``key(*args, **kwargs)``).

        Works on plain and ``async`` functions. The wrapped function gains
        ``cache_clear()`` (this function's entries) and ``uncached`` (the
        original).
        """
        def decorate(function: F) -> F:
            name = f"{function.__module__}.{function.__qualname__}"

            def key_of(args: tuple, kwargs: dict) -> str:
                if key is not None:
                    return f"fn:{name}:{key(*args, **kwargs)}"
                try:
                    blob = pickle.dumps((args, sorted(kwargs.items())), protocol=4)
                except Exception as exc:
                    raise BadRequestError(f"cannot make a cache key for {name}: its arguments do not pickle "
                                          f"({exc}); pass key=... to cached()") from None
                return f"fn:{name}:{hashlib.sha256(blob).hexdigest()}"

            if inspect.iscoroutinefunction(function):
                @functools.wraps(function)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    cache_key = key_of(args, kwargs)
                    found = self.get(cache_key, _MISSING)
                    if found is not _MISSING:
                        return found
                    value = await function(*args, **kwargs)
                    self.set(cache_key, value, ttl)
                    return value

                wrapper: Any = async_wrapper
            else:
                @functools.wraps(function)
                def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
                    cache_key = key_of(args, kwargs)
                    found = self.get(cache_key, _MISSING)
                    if found is not _MISSING:
                        return found
                    value = function(*args, **kwargs)
                    self.set(cache_key, value, ttl)
                    return value

                wrapper = sync_wrapper
            wrapper.cache_clear = lambda: self._cache.clear(f"{self._prefix}fn:{name}:")
            wrapper.uncached = function
            return wrapper  # type: ignore[return-value]

        return decorate


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise BadRequestError(f"cache keys are non-empty strings; got {key!r}")
    return key
