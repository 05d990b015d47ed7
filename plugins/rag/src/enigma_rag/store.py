"""What a collection store keeps and answers, shared by the SQLite and the PostgreSQL stores."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import attrs
import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)
_STOP = frozenset({
    "a", "an", "and", "are", "as", "at", "be", "by", "can", "do", "does", "for", "from", "how", "i", "in", "is",
    "it", "of", "on", "or", "that", "the", "this", "to", "was", "what", "when", "where", "which", "who", "why",
    "will", "with", "you"})


def keyword_terms(query: str) -> list[str]:
    """The words of ``query`` a keyword search looks for (lower-cased, common words left out)."""
    words = [word.lower() for word in _WORD.findall(query)]
    return list(dict.fromkeys(word for word in words if word not in _STOP)) or list(dict.fromkeys(words))


@attrs.frozen
class CollectionInfo:
    embedding_model: str
    dimensions: int
    settings: Mapping[str, Any] = attrs.field(factory=dict)
    """How its passages were cut (``chunk_tokens``, ``chunk_overlap``)."""


@attrs.frozen
class DocumentRecord:
    id: str
    source: str
    content_hash: str
    metadata: Mapping[str, Any]
    chunks: int
    added: str = ""


@attrs.frozen
class StoredChunk:
    id: str
    text: str
    metadata: Mapping[str, Any]
    score: float


class Writer(Protocol):
    """One transaction's writes."""

    def remove_document(self, doc_id: str) -> bool: ...

    def add_document(self, record: DocumentRecord) -> None: ...

    def add_chunks(self, doc_id: str, first_ordinal: int, texts: Sequence[str],
                   metadata: Sequence[Mapping[str, Any]], vectors: np.ndarray) -> None: ...

    def set_chunk_count(self, doc_id: str, chunks: int) -> None: ...


class CollectionStore(Protocol):
    """Where one collection's documents, passages and vectors live."""

    def info(self) -> CollectionInfo | None: ...

    def initialise(self, info: CollectionInfo) -> None: ...

    def drop(self) -> None: ...

    def document(self, doc_id: str) -> DocumentRecord | None: ...

    def documents(self) -> list[DocumentRecord]: ...

    def count(self) -> int: ...

    def chunk_count(self) -> int: ...

    def writing(self) -> Any: ...

    def delete(self, doc_ids: Sequence[str]) -> int: ...

    def vector_search(self, vector: np.ndarray, k: int, where: Mapping[str, Any] | None = None
                      ) -> list[StoredChunk]: ...

    def keyword_search(self, query: str, k: int, where: Mapping[str, Any] | None = None) -> list[StoredChunk]: ...

    def similarities(self, vector: np.ndarray, chunk_ids: Sequence[str]) -> dict[str, float]: ...
