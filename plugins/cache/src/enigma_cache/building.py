"""Levels from names and options: what both InferenceCache and the server's settings build."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from enigma.errors import BadRequestError

LEVELS = ("memory", "disk", "redis")


def parse_levels(levels: str | Sequence[str]) -> list[str]:
    """``"memory,redis"`` or ``["memory", "redis"]`` → checked names, in lookup order (fastest first)."""
    names = [part.strip() for part in levels.split(",")] if isinstance(levels, str) else [str(n) for n in levels]
    names = [name for name in names if name]
    unknown = [name for name in names if name not in LEVELS]
    if unknown or not names:
        raise BadRequestError(f"cache levels must be some of {', '.join(LEVELS)} (comma-separated); got "
                              f"{levels!r}")
    if len(set(names)) != len(names):
        raise BadRequestError(f"cache levels {levels!r} name a level twice")
    return sorted(names, key=LEVELS.index)


def build_levels(names: Sequence[str], *, memory_bytes: int, disk_directory: Path | None, disk_bytes: int,
                 redis_url: str | None, redis_retry_s: float = 5.0, redis_timeout_s: float = 0.25) -> list[Any]:
    from enigma_cache.levels import DiskLevel, MemoryLevel, RedisLevel
    from enigma_cache.metrics import watch_bytes
    from enigma_cache.tiered import level_watcher

    levels: list[Any] = []
    for name in names:
        if name == "memory":
            levels.append(MemoryLevel(memory_bytes))
        elif name == "disk":
            if disk_directory is None:
                from enigma.paths import get_paths

                disk_directory = get_paths().cache_dir / "responses"
            levels.append(DiskLevel(Path(disk_directory), disk_bytes))
        elif name == "redis":
            if not redis_url:
                raise BadRequestError("the redis cache level needs a URL: redis_url = redis://HOST:6379/0 "
                                      "(or host= and port= in InferenceCache)")
            levels.append(RedisLevel(redis_url, retry_s=redis_retry_s, timeout_s=redis_timeout_s,
                                     on_change=level_watcher("redis")))
    for level in levels:
        if level.name in ("memory", "disk"):
            watch_bytes(level)
    return levels
