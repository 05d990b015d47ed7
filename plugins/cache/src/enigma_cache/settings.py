"""``[plugins.cache]``: whether the server answers repeated requests from the cache, and where it keeps them."""

from __future__ import annotations

import attrs

from enigma.config import setting


def _levels_ok(value: str) -> bool:
    from enigma.errors import BadRequestError
    from enigma_cache.building import parse_levels

    if value in ("", "auto"):
        return True
    try:
        parse_levels(value)
    except BadRequestError:
        return False
    return True


@attrs.define
class CacheSettings:
    enabled: bool = setting(False, allowed="true or false", check=lambda v: isinstance(v, bool),
                            doc="answer repeated deterministic requests (temperature 0, or a seed) from the cache")
    levels: str = setting("auto", allowed="auto, or some of memory, disk, redis, comma-separated",
                          check=_levels_ok,
                          doc="where answers are kept, fastest first; auto: memory and disk, and redis when "
                              "redis_url is set")
    ttl_s: float = setting(3600.0, allowed="a positive number of seconds", check=lambda v: v > 0,
                           doc="how long an answer is kept")
    memory_mb: float = setting(256.0, allowed="a positive number", check=lambda v: v > 0,
                               doc="the in-memory level's size (least recently used answers go first)")
    disk_mb: float = setting(1024.0, allowed="a positive number", check=lambda v: v > 0,
                             doc="the disk level's size")
    directory: str = setting("", allowed="empty (the user cache dir's responses/) or a folder", check=lambda v: True,
                             doc="where the disk level lives")
    redis_url: str = setting("", allowed="empty or a redis:// (rediss://, unix://) URL",
                             check=lambda v: v == "" or v.startswith(("redis://", "rediss://", "unix://")),
                             doc="a Redis server that replicas share")
    redis_retry_s: float = setting(5.0, allowed="a positive number of seconds", check=lambda v: v > 0,
                                   doc="while Redis is unreachable, how often to try it again")
    semantic: bool = setting(False, allowed="true or false", check=lambda v: isinstance(v, bool),
                             doc="also answer prompts that mean the same (embedding similarity), deterministic "
                                 "requests only")
    semantic_model: str = setting("all-minilm-l6-v2", allowed="an embedding model's name or folder", check=bool,
                                  doc="the model that embeds prompts for the semantic cache")
    semantic_threshold: float = setting(0.95, allowed="a number from 0 to 1", check=lambda v: 0 <= v <= 1,
                                        doc="the least cosine similarity a cached prompt needs to answer")
    semantic_max_entries: int = setting(10000, allowed="a positive integer", check=lambda v: v > 0,
                                        doc="prompts the semantic index keeps per process (oldest go first)")

    def level_names(self) -> list[str]:
        from enigma_cache.building import parse_levels

        if self.levels in ("", "auto"):
            return ["memory", "disk"] + (["redis"] if self.redis_url else [])
        return parse_levels(self.levels)


def cache_settings() -> CacheSettings:
    """The effective ``[plugins.cache]`` settings (the defaults when the plugin is not registered)."""
    from enigma.config import plugin_settings
    from enigma.errors import NotFoundError

    try:
        return plugin_settings("cache")
    except NotFoundError:
        return CacheSettings()
