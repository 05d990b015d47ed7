"""Chats grounded in a collection: ``extra_body={"rag": {"collection": "docs", "top_k": 4}}``.

The ``enigma_before_generation`` hook searches the collection for the last
user message (a completion's prompt), puts the passages, numbered, into the
system message, and adds ``sources`` to the response (the completion
object; a stream's first chunk) — the passages with file, page, heading and
score.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import attrs

from enigma.errors import BadRequestError
from enigma_rag.answers import Source, context_message, grounded_messages

OPTIONS = {"collection": str, "top_k": int, "threshold": (int, float), "where": dict, "hybrid": bool}

_open: dict[tuple[str, str], Any] = {}
_lock = threading.Lock()


def open_collection(name: str) -> Any:
    """The collection (kept open for the next request); a missing one is a clear 400."""
    from enigma_rag.collection import Collection
    from enigma_rag.settings import rag_settings

    store = rag_settings().store
    with _lock:
        if (store, name) not in _open:
            _open[(store, name)] = Collection(name, store=store, create=False)
        return _open[(store, name)]


def forget_collection(name: str) -> None:
    with _lock:
        for key in [key for key in _open if key[1] == name]:
            del _open[key]


def parse_options(value: Any) -> dict[str, Any]:
    """The request's ``rag`` field, checked: every mistake is a 400 that names the field."""
    if isinstance(value, str):
        value = {"collection": value}
    if not isinstance(value, Mapping):
        raise BadRequestError("'rag' must be a collection name or an object {collection, top_k, threshold, where, "
                              f"hybrid}}, not {type(value).__name__}")
    for key, item in value.items():
        if key not in OPTIONS:
            raise BadRequestError(f"unknown field 'rag.{key}'; known: {', '.join(OPTIONS)}")
        if (isinstance(item, bool) and OPTIONS[key] is not bool) or not isinstance(item, OPTIONS[key]):
            raise BadRequestError(f"'rag.{key}' has the wrong type ({type(item).__name__})")
    if "collection" not in value:
        raise BadRequestError("'rag.collection' is missing: name the collection to search")
    top_k = value.get("top_k")
    if top_k is not None and not 1 <= top_k <= 100:
        raise BadRequestError(f"'rag.top_k' must be from 1 to 100, not {top_k}")
    return dict(value)


def augment(request: Any) -> Any:
    if "rag" not in request.body or request.body["rag"] is None:
        return None
    options = parse_options(request.body["rag"])
    if request.is_chat:
        question = next((m.get("content") or "" for m in reversed(request.messages) if m.get("role") == "user"), "")
    else:
        question = request.prompt if isinstance(request.prompt, str) else ""
    if not question.strip():
        raise BadRequestError("'rag' needs a question: the chat has no user message with text")
    collection = open_collection(options["collection"])
    threshold = options.get("threshold", collection.settings.score_threshold)
    hits = collection.search(question, top_k=options.get("top_k"), where=options.get("where"), threshold=threshold,
                             hybrid=options.get("hybrid", False))
    context = context_message(hits, collection=collection.name)
    request.response_fields["sources"] = [Source.from_hit(hit).as_json() for hit in hits]
    request.response_headers["x-enigma-rag-sources"] = str(len(hits))
    if request.is_chat:
        return attrs.evolve(request, messages=tuple(grounded_messages(request.messages, context)))
    return attrs.evolve(request, prompt=f"{context}\n\n{question}")
