"""Opening retrievers: the retriever kind's caller.

``open_retriever("auto", collection="manuals", embedding_model="all-minilm")``
selects a ``retriever`` implementation, gives it a storage folder of its
own (``<data dir>/retrieval/<retriever>/<collection>``) and an embedder
built from an embedding model (any model ``LLM`` opens whose
``embed()`` works). Retrieval augmentation of requests is a plugin's
``enigma_before_generation`` hook calling :meth:`Retriever.search`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from enigma.errors import BadRequestError
from enigma.kinds import Document, Embedder, Retriever, SearchHit

__all__ = ["Document", "LLMEmbedder", "SearchHit", "check_collection_name", "open_retriever"]

_COLLECTION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class LLMEmbedder:
    """An :class:`~enigma.kinds.Embedder` over an embedding model that :class:`enigma.LLM` loads."""

    def __init__(self, model: Any) -> None:
        from enigma import LLM

        self.llm = model if isinstance(model, LLM) else LLM(model)
        self.name = self.llm.model_name
        """The model's name, as the caller gave it (retrievers record it with a collection)."""
        self.tokenizer = self.llm.tokenizer
        """Its :class:`enigma.tokenizer.Tokenizer`: retrievers cut passages by its tokens."""
        self.max_tokens = self.llm.max_model_len
        """The longest text, in tokens, the model embeds whole (longer ones are truncated)."""
        self.dimensions = len(self.llm.embed(["dimensions"])[0].outputs.embedding)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [output.outputs.embedding for output in self.llm.embed(list(texts))]


def check_collection_name(collection: str) -> str:
    """``collection`` if it is a valid collection name (it names a folder); else a clear error."""
    if not isinstance(collection, str) or not _COLLECTION.match(collection):
        raise BadRequestError(f"collection name {collection!r} is not valid: use letters, digits, '.', '_' "
                              "and '-' (at most 128), starting with a letter or digit")
    return collection


def open_retriever(name: str = "auto", *, collection: str = "default", embedder: Embedder | None = None,
                   embedding_model: str | Path | None = None, storage: str | Path | None = None,
                   host: Any = None) -> Retriever:
    """A retriever for ``collection``: ``name`` selected like any kind (``auto``: the best available).

    Give ``embedder``, or ``embedding_model`` to embed with a model by name or
    folder. ``storage`` overrides where the collection lives.
    """
    check_collection_name(collection)
    if host is None:
        from enigma.plugins import get_host

        host = get_host()
    implementation = host.select("retriever", name)
    if embedder is None and embedding_model is not None:
        embedder = LLMEmbedder(embedding_model)
    if storage is None:
        from enigma.paths import get_paths

        storage = get_paths().data_dir / "retrieval" / implementation.name / collection
    storage = Path(storage)
    storage.mkdir(parents=True, exist_ok=True)
    return implementation.create(collection=collection, storage=storage, embedder=embedder)
