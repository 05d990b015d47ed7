"""The embedded store: one SQLite file per collection, vectors searched by an exact numpy scan.

Passages, their metadata and their float32 vectors live in the file
(WAL mode: searches read while a writer indexes); FTS5 indexes the same
passages for BM25. A search scans every vector — exact, and 6 ms p50 at
100k passages on two cores (BENCHMARKS.md) — from a matrix kept in memory
and reloaded when the file's ``generation`` changes. Why not sqlite-vec: it
must be loaded as an extension, which many Pythons' sqlite3 cannot do
(Debian's 3.11 among them). The scan grows with the collection (about 60 ns
a passage); for large or shared collections use PostgreSQL with pgvector's
HNSW index.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from enigma_rag.store import CollectionInfo, DocumentRecord, StoredChunk, Writer, keyword_terms

SCHEMA = """
CREATE TABLE IF NOT EXISTS info(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents(
    id TEXT PRIMARY KEY, source TEXT NOT NULL, content_hash TEXT NOT NULL, metadata TEXT NOT NULL,
    chunks INTEGER NOT NULL, added TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')));
CREATE TABLE IF NOT EXISTS chunks(
    rowid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, document TEXT NOT NULL, ordinal INTEGER NOT NULL,
    text TEXT NOT NULL, metadata TEXT NOT NULL, embedding BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_document ON chunks(document);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    text, content='chunks', content_rowid='rowid', tokenize='porter unicode61');
CREATE TRIGGER IF NOT EXISTS chunks_fts_insert AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, text) VALUES (new.rowid, new.text); END;
CREATE TRIGGER IF NOT EXISTS chunks_fts_delete AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.rowid, old.text); END;
"""

FILE_NAME = "collection.sqlite"


def _where_sql(where: Mapping[str, Any] | None) -> tuple[str, list[Any]]:
    if not where:
        return "", []
    clauses, values = [], []
    for key, value in where.items():
        clauses.append("json_extract(metadata, ?) = ?")
        values += ['$."' + key.replace('"', '""') + '"', int(value) if isinstance(value, bool) else value]
    return " AND ".join(clauses), values


class SQLiteStore:
    """One collection's SQLite file (:data:`FILE_NAME` in its storage folder)."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / FILE_NAME
        self._local = threading.local()
        self._matrix: tuple[int, np.ndarray, np.ndarray] | None = None  # (generation, rowids, vectors)
        self._lock = threading.Lock()

    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections stay in the thread that made them)."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.executescript(SCHEMA)
            self._local.connection = connection
        return connection

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    # ------------------------------------------------------------ collection

    def info(self) -> CollectionInfo | None:
        values = dict(self.db.execute("SELECT key, value FROM info").fetchall())
        if "embedding_model" not in values:
            return None
        return CollectionInfo(embedding_model=values["embedding_model"], dimensions=int(values["dimensions"]),
                              settings=json.loads(values.get("settings", "{}")))

    def initialise(self, info: CollectionInfo) -> None:
        with self._transaction() as db:
            db.executemany("INSERT OR REPLACE INTO info(key, value) VALUES (?, ?)", [
                ("embedding_model", info.embedding_model), ("dimensions", str(info.dimensions)),
                ("settings", json.dumps(info.settings)), ("generation", "0")])

    def drop(self) -> None:
        """Remove the collection's file."""
        self.close()
        for suffix in ("", "-wal", "-shm"):
            Path(str(self.path) + suffix).unlink(missing_ok=True)

    # ------------------------------------------------------------ documents

    def document(self, doc_id: str) -> DocumentRecord | None:
        row = self.db.execute("SELECT id, source, content_hash, metadata, chunks, added FROM documents "
                              "WHERE id = ?", (doc_id,)).fetchone()
        return None if row is None else DocumentRecord(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5])

    def documents(self) -> list[DocumentRecord]:
        rows = self.db.execute("SELECT id, source, content_hash, metadata, chunks, added FROM documents "
                               "ORDER BY source, id").fetchall()
        return [DocumentRecord(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5]) for r in rows]

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM documents").fetchone()[0]

    def chunk_count(self) -> int:
        return self.db.execute("SELECT count(*) FROM chunks").fetchone()[0]

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("UPDATE info SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def writing(self) -> Iterator[Writer]:
        """A transaction: all that the writer does is kept together, or none of it (an error rolls back)."""
        with self._transaction() as db:
            yield _SQLiteWriter(db)

    def delete(self, doc_ids: Sequence[str]) -> int:
        with self._transaction() as db:
            writer = _SQLiteWriter(db)
            return sum(writer.remove_document(doc_id) for doc_id in doc_ids)

    # ------------------------------------------------------------ search

    def _vectors(self) -> tuple[np.ndarray, np.ndarray]:
        generation = int(self.db.execute("SELECT value FROM info WHERE key = 'generation'").fetchone()[0])
        with self._lock:
            if self._matrix is None or self._matrix[0] != generation:
                rows = self.db.execute("SELECT rowid, embedding FROM chunks ORDER BY rowid").fetchall()
                rowids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
                info = self.info()
                vectors = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32).reshape(
                    len(rows), info.dimensions if info else 0)
                self._matrix = (generation, rowids, vectors)
            return self._matrix[1], self._matrix[2]

    def _allowed(self, rowids: np.ndarray, where: Mapping[str, Any] | None) -> np.ndarray | None:
        clause, values = _where_sql(where)
        if not clause:
            return None
        keep = [row[0] for row in self.db.execute(f"SELECT rowid FROM chunks WHERE {clause}", values)]
        return np.isin(rowids, np.asarray(keep, dtype=np.int64))

    def vector_search(self, vector: np.ndarray, k: int, where: Mapping[str, Any] | None = None) -> list[StoredChunk]:
        rowids, vectors = self._vectors()
        if not len(rowids):
            return []
        scores = vectors @ vector.astype(np.float32)
        allowed = self._allowed(rowids, where)
        if allowed is not None:
            scores = np.where(allowed, scores, -np.inf)
        k = min(k, int(np.isfinite(scores).sum()))
        if k <= 0:
            return []
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        return self._rows([int(rowids[i]) for i in best], [float(scores[i]) for i in best])

    def keyword_search(self, query: str, k: int, where: Mapping[str, Any] | None = None) -> list[StoredChunk]:
        terms = keyword_terms(query)
        if not terms:
            return []
        match = " OR ".join('"' + term + '"' for term in terms)
        clause, values = _where_sql(where)
        sql = ("SELECT chunks.rowid, -bm25(chunks_fts) FROM chunks_fts JOIN chunks ON chunks.rowid = chunks_fts.rowid "
               f"WHERE chunks_fts MATCH ? {'AND ' + clause if clause else ''} ORDER BY bm25(chunks_fts) LIMIT ?")
        rows = self.db.execute(sql, [match, *values, k]).fetchall()
        return self._rows([row[0] for row in rows], [float(row[1]) for row in rows])

    def similarities(self, vector: np.ndarray, chunk_ids: Sequence[str]) -> dict[str, float]:
        """Cosine similarity of ``vector`` with each of these passages."""
        if not chunk_ids:
            return {}
        marks = ",".join("?" * len(chunk_ids))
        rows = self.db.execute(f"SELECT id, embedding FROM chunks WHERE id IN ({marks})", list(chunk_ids)).fetchall()
        return {row[0]: float(np.frombuffer(row[1], dtype=np.float32) @ vector) for row in rows}

    def _rows(self, rowids: list[int], scores: list[float]) -> list[StoredChunk]:
        if not rowids:
            return []
        marks = ",".join("?" * len(rowids))
        found = {row[0]: row[1:] for row in self.db.execute(
            f"SELECT rowid, id, text, metadata FROM chunks WHERE rowid IN ({marks})", rowids)}
        return [StoredChunk(found[r][0], found[r][1], json.loads(found[r][2]), score)
                for r, score in zip(rowids, scores) if r in found]


class _SQLiteWriter:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def remove_document(self, doc_id: str) -> bool:
        self.db.execute("DELETE FROM chunks WHERE document = ?", (doc_id,))
        return self.db.execute("DELETE FROM documents WHERE id = ?", (doc_id,)).rowcount > 0

    def add_document(self, record: DocumentRecord) -> None:
        self.db.execute("INSERT INTO documents(id, source, content_hash, metadata, chunks) VALUES (?, ?, ?, ?, ?)",
                        (record.id, record.source, record.content_hash, json.dumps(record.metadata), record.chunks))

    def add_chunks(self, doc_id: str, first_ordinal: int, texts: Sequence[str], metadata: Sequence[Mapping[str, Any]],
                   vectors: np.ndarray) -> None:
        self.db.executemany(
            "INSERT INTO chunks(id, document, ordinal, text, metadata, embedding) VALUES (?, ?, ?, ?, ?, ?)",
            [(f"{doc_id}#{first_ordinal + i}", doc_id, first_ordinal + i, text, json.dumps(meta),
              np.ascontiguousarray(vector, dtype=np.float32).tobytes())
             for i, (text, meta, vector) in enumerate(zip(texts, metadata, vectors))])

    def set_chunk_count(self, doc_id: str, chunks: int) -> None:
        self.db.execute("UPDATE documents SET chunks = ? WHERE id = ?", (chunks, doc_id))
