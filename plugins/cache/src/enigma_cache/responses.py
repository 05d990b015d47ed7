"""The server's response cache: the before-generation and generation-finished hooks' work.

A deterministic request (temperature 0, or a seed with one completion) is
looked up by its key (:mod:`enigma_cache.keys`); a hit answers with the
stored stream, chunk for chunk, and ``x-enigma-cache: hit``; a miss runs and
its answer is stored when it finishes. With ``semantic`` on, a miss embeds
the prompt and answers with the answer of the most similar cached prompt
above the threshold.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import attrs

from enigma_cache.codec import CorruptEntry, decode_json, encode_json
from enigma_cache.keys import Decision, decide, prompt_text
from enigma_cache.metrics import cache_metrics
from enigma_cache.settings import CacheSettings
from enigma_cache.tiered import TieredCache

logger = logging.getLogger("enigma.cache")

HEADER = "x-enigma-cache"
ENTRY_VERSION = 1
_PENDING_LIMIT = 4096


class ResponseCache:
    def __init__(self, settings: CacheSettings) -> None:
        from enigma_cache.building import build_levels

        self.settings = settings
        self.cache = TieredCache(build_levels(
            settings.level_names(), memory_bytes=int(settings.memory_mb * 2**20),
            disk_bytes=int(settings.disk_mb * 2**20),
            disk_directory=Path(settings.directory) if settings.directory else None,
            redis_url=settings.redis_url or None, redis_retry_s=settings.redis_retry_s))
        self.metrics = cache_metrics()
        self._semantic: Any = None
        self._semantic_lock = threading.Lock()
        self._pending: OrderedDict[str, tuple[str, Any]] = OrderedDict()
        """key -> (space, prompt vector) of misses, until their answers are stored."""
        self._pending_lock = threading.Lock()

    # ------------------------------------------------------------ hooks

    def lookup(self, request: Any) -> Any:
        """The before-generation hook: an answer, or the request marked hit/miss/bypass."""
        from enigma.server import GenerationAnswer

        decision = decide(request, ttl=self.settings.ttl_s, semantic=self.settings.semantic)
        if not decision.lookup:
            self.metrics.bypassed.labels(decision.reason).inc()
            return _mark(request, "bypass" if not decision.store else "miss")
        found = self.cache.get(decision.key, _decode_entry)
        similarity = None
        if found is None and decision.semantic:
            found, similarity = self._semantic_lookup(request, decision)
        if found is None:
            self.metrics.misses.inc()
            return _mark(request, "miss")
        entry, level = found
        level = "semantic" if similarity is not None else level
        self.metrics.hits.labels(level).inc()
        headers = {HEADER: "hit", f"{HEADER}-level": level, "age": str(max(int(time.time() - entry["created"]), 0))}
        if similarity is not None:
            headers[f"{HEADER}-similarity"] = f"{similarity:.4f}"
        return GenerationAnswer(text=entry["text"], finish_reason=entry["finish_reason"],
                                chunks=tuple((text, tuple(ids)) for text, ids in entry["chunks"]),
                                response_headers=headers, response_fields=entry.get("fields") or {})

    def store(self, request: Any, output: Any, chunks: list[list[tuple[str, list[int]]]]) -> None:
        """The generation-finished hook: keep the answer of a request ``lookup`` marked a miss."""
        if request.response_headers.get(HEADER) != "miss" or not output.outputs:
            return
        decision = decide(request, ttl=self.settings.ttl_s, semantic=self.settings.semantic)
        if not decision.store:
            return
        first = output.outputs[0]
        if first.finish_reason not in ("stop", "length"):
            return
        entry = {"v": ENTRY_VERSION, "text": first.text, "finish_reason": first.finish_reason,
                 "chunks": [[text, list(ids)] for text, ids in chunks[0]] if chunks else [[first.text,
                                                                                           first.token_ids]],
                 "fields": request.response_fields, "created": time.time()}
        self.cache.set(decision.key, encode_json(entry), decision.ttl)
        with self._pending_lock:
            pending = self._pending.pop(decision.key, None)
        if pending is not None and self._semantic is not None:
            self._semantic.add(pending[0], decision.key, pending[1])

    def health(self) -> dict[str, Any]:
        report = self.cache.status()
        report["stats"] = self.cache.stats()
        if self._semantic is not None:
            report["semantic_entries"] = len(self._semantic)
        return report

    def close(self) -> None:
        self.cache.close()

    def warm_up(self) -> None:
        """Load the semantic index's embedding model (``semantic`` on)."""
        self._semantic_index()

    # ------------------------------------------------------------ semantic

    def _semantic_index(self) -> Any:
        with self._semantic_lock:
            if self._semantic is None:
                from enigma.retrieval import LLMEmbedder
                from enigma_cache.semantic import SemanticIndex

                embedder = LLMEmbedder(self.settings.semantic_model)
                self._semantic = SemanticIndex(lambda text: embedder.embed([text])[0],
                                               threshold=self.settings.semantic_threshold,
                                               max_entries=self.settings.semantic_max_entries)
            return self._semantic

    def _semantic_lookup(self, request: Any, decision: Decision) -> tuple[Any, float | None]:
        text = prompt_text(request)
        if not text:
            return None, None
        index = self._semantic_index()
        vector = index.embed(text)
        with self._pending_lock:
            self._pending[decision.key] = (decision.semantic_space, vector)
            while len(self._pending) > _PENDING_LIMIT:
                self._pending.popitem(last=False)
        match = index.nearest(decision.semantic_space, vector)
        if match is None:
            return None, None
        key, similarity = match
        found = self.cache.get(key, _decode_entry)
        if found is None:  # the answer expired or was evicted
            index.forget(key)
            return None, None
        return found, similarity


def _mark(request: Any, state: str) -> Any:
    return attrs.evolve(request, response_headers={**request.response_headers, HEADER: state})


def _decode_entry(blob: bytes) -> dict[str, Any]:
    entry = decode_json(blob)
    if not isinstance(entry, dict) or entry.get("v") != ENTRY_VERSION or not isinstance(entry.get("text"), str) \
            or not isinstance(entry.get("chunks"), list) \
            or "".join(chunk[0] for chunk in entry["chunks"]) != entry["text"]:
        raise CorruptEntry("not a response-cache entry of this version")
    return entry


_caches: dict[Any, ResponseCache] = {}
_caches_lock = threading.Lock()


def response_cache(settings: CacheSettings) -> ResponseCache:
    """The process's cache for these settings (one per distinct settings: tests change them)."""
    key = attrs.astuple(settings)
    with _caches_lock:
        cache = _caches.get(key)
        if cache is None:
            cache = _caches[key] = ResponseCache(settings)
        return cache


def active_caches() -> list[ResponseCache]:
    with _caches_lock:
        return list(_caches.values())
