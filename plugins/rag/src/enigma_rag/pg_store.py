"""Collections in PostgreSQL with pgvector: shared by several servers, searched through an HNSW index.

Three kinds of table: ``enigma_rag_collections`` (one row per collection:
its embedding model, dimensions and passage table), ``enigma_rag_documents``
and one passage table per collection (its vectors have the collection's
dimensions, which an HNSW index needs), with a generated ``tsvector`` column
for keyword search. Filtered searches scan exactly (an HNSW scan filters
after it finds its candidates, and could return fewer than ``k``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from enigma.errors import NotAvailableError
from enigma.urls import redacted
from enigma_rag.store import CollectionInfo, DocumentRecord, StoredChunk, keyword_terms

SCHEMA = """
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS enigma_rag_collections(
    name TEXT PRIMARY KEY, embedding_model TEXT NOT NULL, dimensions INTEGER NOT NULL, settings JSONB NOT NULL,
    chunk_table TEXT NOT NULL, created TIMESTAMPTZ NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS enigma_rag_documents(
    collection TEXT NOT NULL, id TEXT NOT NULL, source TEXT NOT NULL, content_hash TEXT NOT NULL,
    metadata JSONB NOT NULL, chunks INTEGER NOT NULL, added TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (collection, id));
"""


EF_SEARCH = 100
"""HNSW's candidate list per search (pgvector's default, 40, loses too many true neighbours)."""


def _connect(dsn: str) -> Any:
    try:
        import psycopg
    except ImportError:
        raise NotAvailableError("a postgres:// store needs psycopg: pip install 'enigma-plugin-rag[postgres]'") \
            from None
    try:
        return psycopg.connect(dsn, autocommit=True)
    except psycopg.OperationalError as exc:
        raise NotAvailableError(f"cannot connect to PostgreSQL at {redacted(dsn)}: {exc}".strip()) from exc


def _vector(values: np.ndarray) -> str:
    return "[" + ",".join(f"{float(v):.7g}" for v in values) + "]"


def _where_sql(where: Mapping[str, Any] | None) -> tuple[str, list[Any]]:
    if not where:
        return "", []
    return "metadata @> %s::jsonb", [json.dumps(dict(where))]


def list_collections(dsn: str) -> list[str]:
    """Names of the collections in the database at ``dsn``."""
    connection = _connect(dsn)
    try:
        connection.execute(SCHEMA)
        return [row[0] for row in connection.execute("SELECT name FROM enigma_rag_collections ORDER BY name")]
    finally:
        connection.close()


class PostgresStore:
    """One collection in the PostgreSQL database at ``dsn``."""

    def __init__(self, dsn: str, collection: str) -> None:
        from psycopg import sql

        self.dsn, self.collection = dsn, collection
        self.connection = _connect(dsn)
        self.connection.execute(SCHEMA)
        self._lock = threading.RLock()
        self.table = sql.Identifier("enigma_rag_chunks_" + hashlib.sha1(collection.encode()).hexdigest()[:16])
        self._sql = sql

    def _execute(self, query: Any, params: Sequence[Any] = ()) -> Any:
        with self._lock:
            return self.connection.execute(query, params)

    def close(self) -> None:
        self.connection.close()

    # ------------------------------------------------------------ collection

    def info(self) -> CollectionInfo | None:
        row = self._execute("SELECT embedding_model, dimensions, settings FROM enigma_rag_collections WHERE name = %s",
                            (self.collection,)).fetchone()
        return None if row is None else CollectionInfo(row[0], row[1], row[2])

    def initialise(self, info: CollectionInfo) -> None:
        sql = self._sql
        with self._lock, self.connection.transaction():
            self.connection.execute(
                "INSERT INTO enigma_rag_collections(name, embedding_model, dimensions, settings, chunk_table) "
                "VALUES (%s, %s, %s, %s, %s)",
                (self.collection, info.embedding_model, info.dimensions, json.dumps(dict(info.settings)),
                 self.table.as_string(self.connection)))
            self.connection.execute(sql.SQL(
                "CREATE TABLE {t}(id TEXT PRIMARY KEY, document TEXT NOT NULL, ordinal INTEGER NOT NULL, "
                "text TEXT NOT NULL, metadata JSONB NOT NULL, embedding vector({d}) NOT NULL, "
                "tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED)").format(
                    t=self.table, d=sql.Literal(info.dimensions)))
            self.connection.execute(sql.SQL("CREATE INDEX ON {t} USING hnsw (embedding vector_cosine_ops)").format(
                t=self.table))
            self.connection.execute(sql.SQL("CREATE INDEX ON {t} USING gin (tsv)").format(t=self.table))
            self.connection.execute(sql.SQL("CREATE INDEX ON {t} (document)").format(t=self.table))

    def drop(self) -> None:
        with self._lock, self.connection.transaction():
            self.connection.execute(self._sql.SQL("DROP TABLE IF EXISTS {t}").format(t=self.table))
            self.connection.execute("DELETE FROM enigma_rag_documents WHERE collection = %s", (self.collection,))
            self.connection.execute("DELETE FROM enigma_rag_collections WHERE name = %s", (self.collection,))

    # ------------------------------------------------------------ documents

    def _records(self, where: str, params: Sequence[Any]) -> list[DocumentRecord]:
        rows = self._execute("SELECT id, source, content_hash, metadata, chunks, added FROM enigma_rag_documents "
                             f"WHERE collection = %s {where} ORDER BY source, id", (self.collection, *params))
        return [DocumentRecord(r[0], r[1], r[2], r[3], r[4], r[5].strftime("%Y-%m-%dT%H:%M:%SZ")) for r in rows]

    def document(self, doc_id: str) -> DocumentRecord | None:
        found = self._records("AND id = %s", (doc_id,))
        return found[0] if found else None

    def documents(self) -> list[DocumentRecord]:
        return self._records("", ())

    def count(self) -> int:
        return self._execute("SELECT count(*) FROM enigma_rag_documents WHERE collection = %s",
                             (self.collection,)).fetchone()[0]

    def chunk_count(self) -> int:
        return self._execute(self._sql.SQL("SELECT count(*) FROM {t}").format(t=self.table)).fetchone()[0]

    @contextlib.contextmanager
    def writing(self) -> Iterator[_PostgresWriter]:
        with self._lock, self.connection.transaction():
            yield _PostgresWriter(self)

    def delete(self, doc_ids: Sequence[str]) -> int:
        with self.writing() as writer:
            return sum(writer.remove_document(doc_id) for doc_id in doc_ids)

    # ------------------------------------------------------------ search

    def vector_search(self, vector: np.ndarray, k: int, where: Mapping[str, Any] | None = None) -> list[StoredChunk]:
        sql = self._sql
        clause, values = _where_sql(where)
        query = sql.SQL("SELECT id, text, metadata, 1 - (embedding <=> %s::vector) FROM {t} {w} "
                        "ORDER BY embedding <=> %s::vector LIMIT %s").format(
            t=self.table, w=sql.SQL("WHERE " + clause if clause else ""))
        text = _vector(vector)
        with self._lock, self.connection.transaction():
            candidates = sql.Literal(max(EF_SEARCH, 4 * k))
            self.connection.execute(sql.SQL("SET LOCAL hnsw.ef_search = {n}").format(n=candidates))
            if clause:
                self.connection.execute("SET LOCAL enable_indexscan = off")
            rows = self.connection.execute(query, (text, *values, text, k)).fetchall()
        return [StoredChunk(r[0], r[1], r[2], float(r[3])) for r in rows]

    def keyword_search(self, query: str, k: int, where: Mapping[str, Any] | None = None) -> list[StoredChunk]:
        terms = keyword_terms(query)
        if not terms:
            return []
        sql = self._sql
        clause, values = _where_sql(where)
        tsquery = " | ".join(term.replace("'", "") for term in terms)
        statement = sql.SQL("SELECT id, text, metadata, ts_rank_cd(tsv, q) FROM {t}, to_tsquery('english', %s) q "
                            "WHERE tsv @@ q {w} ORDER BY ts_rank_cd(tsv, q) DESC, id LIMIT %s").format(
            t=self.table, w=sql.SQL("AND " + clause if clause else ""))
        rows = self._execute(statement, (tsquery, *values, k)).fetchall()
        return [StoredChunk(r[0], r[1], r[2], float(r[3])) for r in rows]

    def similarities(self, vector: np.ndarray, chunk_ids: Sequence[str]) -> dict[str, float]:
        if not chunk_ids:
            return {}
        rows = self._execute(self._sql.SQL("SELECT id, 1 - (embedding <=> %s::vector) FROM {t} WHERE id = ANY(%s)")
                             .format(t=self.table), (_vector(vector), list(chunk_ids))).fetchall()
        return {row[0]: float(row[1]) for row in rows}


class _PostgresWriter:
    def __init__(self, store: PostgresStore) -> None:
        self.store, self.connection, self.sql = store, store.connection, store._sql

    def remove_document(self, doc_id: str) -> bool:
        self.connection.execute(self.sql.SQL("DELETE FROM {t} WHERE document = %s").format(t=self.store.table),
                                (doc_id,))
        return self.connection.execute("DELETE FROM enigma_rag_documents WHERE collection = %s AND id = %s",
                                       (self.store.collection, doc_id)).rowcount > 0

    def add_document(self, record: DocumentRecord) -> None:
        self.connection.execute(
            "INSERT INTO enigma_rag_documents(collection, id, source, content_hash, metadata, chunks) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (self.store.collection, record.id, record.source, record.content_hash, json.dumps(dict(record.metadata)),
             record.chunks))

    def add_chunks(self, doc_id: str, first_ordinal: int, texts: Sequence[str], metadata: Sequence[Mapping[str, Any]],
                   vectors: np.ndarray) -> None:
        statement = self.sql.SQL("COPY {t}(id, document, ordinal, text, metadata, embedding) FROM STDIN").format(
            t=self.store.table)
        with self.connection.cursor().copy(statement) as copy:
            for i, (text, meta, vector) in enumerate(zip(texts, metadata, vectors)):
                copy.write_row((f"{doc_id}#{first_ordinal + i}", doc_id, first_ordinal + i, text.replace("\x00", ""),
                                json.dumps(meta), _vector(vector)))

    def set_chunk_count(self, doc_id: str, chunks: int) -> None:
        self.connection.execute("UPDATE enigma_rag_documents SET chunks = %s WHERE collection = %s AND id = %s",
                                (chunks, self.store.collection, doc_id))
