"""Builtin plugin ``paged``: the paged KV cache with prefix caching, and the
``contiguous`` max-length baseline."""

from __future__ import annotations

from enigma import hookimpl


@hookimpl
def enigma_register_caches(register):
    register("paged", "enigma.engine.block_manager:PagedCache", priority=0,
             summary="paged KV blocks, reference-counted, with automatic prefix caching")
    register("contiguous", "enigma.engine.block_manager:ContiguousCache", priority=-10,
             summary="baseline: each sequence reserves its maximum length up front")
