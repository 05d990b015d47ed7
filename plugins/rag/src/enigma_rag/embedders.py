"""Embedding models, loaded once per process and shared by every collection that uses them."""

from __future__ import annotations

import threading
from typing import Any

from enigma.retrieval import LLMEmbedder

_loaded: dict[str, Any] = {}
_lock = threading.Lock()


def embedder_for(model: str) -> Any:
    """The :class:`~enigma.retrieval.LLMEmbedder` of ``model`` (a name or folder), loaded on first use."""
    with _lock:
        if model not in _loaded:
            _loaded[model] = LLMEmbedder(model)
        return _loaded[model]


def embedder_name(embedder: Any) -> str:
    """What a collection records about the model that embeds it."""
    return str(getattr(embedder, "name", None) or type(embedder).__qualname__)
