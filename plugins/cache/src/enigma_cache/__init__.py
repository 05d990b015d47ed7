"""enigma-plugin-cache: answers to repeated requests, from memory, disk or a shared Redis.

``InferenceCache`` (the seed's ``InferenceCache(backend='redis', host=...)``
with ``@cache.cached(ttl=...)``) for any Python function; for the server, a
response cache turned on by ``[plugins.cache] enabled = true``: exact-match
for deterministic requests, semantic on request, ``x-enigma-cache`` headers,
``extra_body={"cache": false}`` and ``Cache-Control: no-cache`` to skip it,
``enigma cache stats|clear``. This module is what the entry point names: it
imports only ``enigma``.
"""

from __future__ import annotations

from enigma import hookimpl
from enigma.lazy import lazy_exports

_LAZY = {"InferenceCache": "enigma_cache.inference_cache", "TieredCache": "enigma_cache.tiered",
         "CacheSettings": "enigma_cache.settings", "CorruptEntry": "enigma_cache.codec"}

__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = sorted(_LAZY)


def _server_cache():
    from enigma_cache.responses import response_cache
    from enigma_cache.settings import cache_settings

    settings = cache_settings()
    return response_cache(settings) if settings.enabled else None


@hookimpl
def enigma_plugin_settings():
    from enigma_cache.settings import CacheSettings

    return CacheSettings


@hookimpl
def enigma_request_fields():
    from enigma_cache.keys import REQUEST_FIELD

    return {"cache": REQUEST_FIELD}


@hookimpl(tryfirst=True)
def enigma_before_generation(request):
    cache = _server_cache()
    if cache is None:
        if request.body.get("cache") is not None:
            from enigma_cache.keys import decide

            decide(request, ttl=1.0, semantic=False)  # a bad 'cache' value is refused even when off
        return None
    return cache.lookup(request)


@hookimpl
def enigma_generation_finished(request, output, chunks):
    cache = _server_cache()
    if cache is not None:
        cache.store(request, output, chunks)


@hookimpl
def enigma_engine_started(engine):
    """Load the semantic cache's embedding model now, not on the first request's event-loop turn."""
    cache = _server_cache()
    if cache is not None and cache.settings.semantic:
        cache.warm_up()


@hookimpl
def enigma_health():
    from enigma_cache.settings import cache_settings

    if not cache_settings().enabled:
        return None
    return _server_cache().health()


@hookimpl
def enigma_commands(cli):
    from enigma_cache.cli import cache

    cli.add_command(cache)
