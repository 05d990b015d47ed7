"""The vector retriever: passages cut, embedded and kept in a store; searched by vector, or hybrid.

One instance serves one collection, in SQLite (``sqlite``, the default) or
PostgreSQL (``pgvector``). It satisfies :class:`enigma.kinds.Retriever`
(``add`` / ``search`` / ``delete`` / ``count``) and adds what files need:
:meth:`VectorRetriever.index` takes a document's sections and replaces its
passages in one transaction.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from enigma.errors import BadRequestError, NotFoundError
from enigma.kinds import Document, SearchHit
from enigma_rag.chunking import Chunk, chunk_sections, word_spans
from enigma_rag.embedders import embedder_for, embedder_name
from enigma_rag.loaders import Section
from enigma_rag.store import CollectionInfo, CollectionStore, DocumentRecord, StoredChunk

EMBED_BATCH = 64
RRF_K = 60
"""Reciprocal-rank fusion's constant, as Cormack et al. and most hybrid searches use it."""

Reranker = Callable[[str, list[SearchHit]], list[SearchHit]]
"""``(query, hits)`` → the hits in a better order (a cross-encoder, say); may drop some."""


def content_hash(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


class VectorRetriever:
    """One collection: passages of its documents, their vectors, and searches over them."""

    def __init__(self, *, collection: str, storage: Path | None = None, embedder: Any = None,
                 store: CollectionStore | None = None, create: bool = True, settings: Any = None) -> None:
        from enigma_rag.settings import rag_settings

        self.collection = collection
        self.settings = settings or rag_settings()
        if store is None:
            from enigma_rag.sqlite_store import SQLiteStore

            store = SQLiteStore(storage)
        self.store = store
        info = store.info()
        if info is None:
            if not create:
                raise NotFoundError(f"collection {collection!r} does not exist; make it with "
                                    f"'enigma rag add {collection} FILES...' (or add documents to it)")
            embedder = embedder or embedder_for(self.settings.embedding_model)
            info = CollectionInfo(embedding_model=embedder_name(embedder), dimensions=int(embedder.dimensions),
                                  settings={"chunk_tokens": self.settings.chunk_tokens,
                                            "chunk_overlap": self.settings.chunk_overlap})
            store.initialise(info)
        elif embedder is None:
            embedder = embedder_for(info.embedding_model)
        elif embedder_name(embedder) != info.embedding_model or int(embedder.dimensions) != info.dimensions:
            raise BadRequestError(
                f"collection {collection!r} was embedded with {info.embedding_model!r} ({info.dimensions} "
                f"dimensions), not {embedder_name(embedder)!r} ({embedder.dimensions}); search it with the "
                "model it was built with, or build a new collection")
        self.info, self.embedder = info, embedder
        self.max_tokens = int(info.settings.get("chunk_tokens", self.settings.chunk_tokens))
        self.overlap = int(info.settings.get("chunk_overlap", self.settings.chunk_overlap))
        model_limit = getattr(embedder, "max_tokens", None)
        if model_limit:
            self.max_tokens = min(self.max_tokens, int(model_limit) - 2)  # room for [CLS] and [SEP]
        tokenizer = getattr(embedder, "tokenizer", None)
        self.token_spans = tokenizer.token_spans if tokenizer is not None else word_spans

    # ------------------------------------------------------------ writing

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors of ``texts``, float32, one row each."""
        vectors = np.asarray(self.embedder.embed(list(texts)), dtype=np.float32).reshape(len(texts), -1)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.where(norms == 0, 1, norms)

    def index(self, doc_id: str, sections: Iterable[Section], *, source: str, digest: str,
              metadata: Mapping[str, Any] | None = None, progress: Callable[[int], None] | None = None) -> int:
        """Replace document ``doc_id``'s passages with those of ``sections``, in one transaction: if
        anything fails (an unreadable page, an interrupt) the collection is as it was. Returns the
        number of passages."""
        metadata = dict(metadata or {})
        chunks = chunk_sections(sections, self.token_spans, max_tokens=self.max_tokens, overlap=self.overlap)
        total = 0
        with self.store.writing() as writer:
            writer.remove_document(doc_id)
            writer.add_document(DocumentRecord(doc_id, source, digest, metadata, 0))
            batch: list[Chunk] = []
            for chunk in chunks:
                batch.append(chunk)
                if len(batch) == EMBED_BATCH:
                    self._write(writer, doc_id, source, metadata, total, batch)
                    total += len(batch)
                    batch = []
                    if progress:
                        progress(total)
            if batch:
                self._write(writer, doc_id, source, metadata, total, batch)
                total += len(batch)
                if progress:
                    progress(total)
            writer.set_chunk_count(doc_id, total)
        return total

    def _write(self, writer: Any, doc_id: str, source: str, metadata: dict[str, Any], first: int,
               batch: list[Chunk]) -> None:
        vectors = self.embed([_embedding_text(chunk) for chunk in batch])
        writer.add_chunks(doc_id, first, [chunk.text for chunk in batch], [
            {**metadata, "source": source, "document": doc_id, "chunk": first + i, "page": chunk.page,
             "heading": list(chunk.heading), "start": chunk.start, "end": chunk.end}
            for i, chunk in enumerate(batch)], vectors)

    def add(self, documents: Iterable[Document]) -> list[str]:
        """Index texts (the kernel's retriever contract): an id given again replaces that document;
        the same text under the same id is left as it is."""
        ids = []
        for document in documents:
            doc_id = document.id or uuid.uuid4().hex
            digest = content_hash(document.text)
            existing = self.store.document(doc_id)
            if existing is None or existing.content_hash != digest:
                source = str(document.metadata.get("source", doc_id))
                self.index(doc_id, [Section(document.text, 0)], source=source, digest=digest,
                           metadata=document.metadata)
            ids.append(doc_id)
        return ids

    def delete(self, ids: Iterable[str]) -> int:
        return self.store.delete(list(ids))

    def count(self) -> int:
        return self.store.count()

    # ------------------------------------------------------------ searching

    def search(self, query: str, *, k: int = 4, where: Mapping[str, Any] | None = None,
               threshold: float | None = None, hybrid: bool = False, rerank: Reranker | None = None
               ) -> list[SearchHit]:
        """The ``k`` passages most like ``query``, best first, each scored by cosine similarity.

        ``where`` keeps passages whose metadata has those values; ``threshold``
        drops passages scoring below it; ``hybrid`` fuses the vector ranking with
        a keyword ranking (BM25 in SQLite, ``ts_rank_cd`` in PostgreSQL) by
        reciprocal rank; ``rerank`` reorders the candidates before the cut to ``k``.
        """
        if k < 1:
            raise BadRequestError(f"k must be at least 1, not {k}")
        vector = self.embed([query])[0]
        wanted = max(4 * k, 20) if (hybrid or rerank) else k
        found = self.store.vector_search(vector, wanted, where)
        if hybrid:
            found = self._fuse(vector, found, self.store.keyword_search(query, wanted, where))
        hits = [SearchHit(id=chunk.id, text=chunk.text, score=chunk.score, metadata=chunk.metadata)
                for chunk in found if threshold is None or chunk.score >= threshold]
        if rerank is not None:
            hits = list(rerank(query, hits))
        return hits[:k]

    def _fuse(self, vector: np.ndarray, by_vector: list[StoredChunk], by_keyword: list[StoredChunk]
              ) -> list[StoredChunk]:
        fused: dict[str, float] = {}
        chunks: dict[str, StoredChunk] = {}
        for ranking in (by_vector, by_keyword):
            for rank, chunk in enumerate(ranking):
                fused[chunk.id] = fused.get(chunk.id, 0.0) + 1.0 / (RRF_K + rank + 1)
                chunks.setdefault(chunk.id, chunk)
        cosine = {chunk.id: chunk.score for chunk in by_vector}
        missing = [chunk_id for chunk_id in chunks if chunk_id not in cosine]
        cosine.update(self.store.similarities(vector, missing))
        order = sorted(fused, key=lambda chunk_id: -fused[chunk_id])
        return [StoredChunk(chunks[i].id, chunks[i].text, chunks[i].metadata, cosine.get(i, 0.0)) for i in order]


def _embedding_text(chunk: Chunk) -> str:
    """The passage as it is embedded: under its heading path, so a passage deep in a section still
    says what it is about."""
    if not chunk.heading:
        return chunk.text
    path = " > ".join(chunk.heading)
    return chunk.text if chunk.text.startswith(path) else f"{path}\n{chunk.text}"

