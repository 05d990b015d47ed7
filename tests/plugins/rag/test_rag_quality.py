"""Retrieval quality on the Python docs with MiniLM: recall@5 at least 0.9; pgvector ranks as SQLite does."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import python_docs
from enigma_rag import Collection
from enigma_rag.store import DocumentRecord


@pytest.fixture(scope="module")
def sources():
    try:
        return python_docs.docs_sources()
    except (OSError, subprocess.SubprocessError, StopIteration) as exc:
        pytest.skip(f"the Python docs (Debian's python3.11-doc) cannot be had here: {exc}")


@pytest.mark.slow
def test_recall_at_5_on_the_python_docs(enigma_home, minilm, sources, postgres_url):
    docs = Collection("python-docs")
    report = docs.add_documents(python_docs.corpus_files(sources))
    assert not report.errors and report.count("added") == 18
    rows = docs.retriever.store.db.execute("SELECT id, text, metadata, embedding, document, ordinal FROM chunks "
                                           "ORDER BY rowid").fetchall()
    passages = [(row[0], row[1], tuple(json.loads(row[2])["heading"])) for row in rows]
    asked = python_docs.questions(sources, passages)
    assert len(asked) > 200
    recall, mrr = python_docs.evaluate(docs, asked)
    hybrid_recall, hybrid_mrr = python_docs.evaluate(docs, asked, hybrid=True)
    print(f"\n{len(asked)} questions, {len(rows)} passages: recall@5 {recall:.3f}, MRR {mrr:.3f}; "
          f"hybrid recall@5 {hybrid_recall:.3f}, MRR {hybrid_mrr:.3f}")
    assert recall >= 0.9 and hybrid_recall >= 0.9
    assert mrr > 0.7

    # the same passages and vectors in PostgreSQL: the same five best for every question
    shared = Collection("python-docs", store=postgres_url, embedder=minilm)
    with shared.retriever.store.writing() as writer:
        for record in docs.documents():
            writer.add_document(DocumentRecord(record.id, record.source, record.content_hash, record.metadata,
                                               record.chunks))
        for row in rows:
            writer.add_chunks(row[4], row[5], [row[1]], [json.loads(row[2])],
                              np.frombuffer(row[3], dtype=np.float32)[None])
    differing = 0
    for question, _ in asked:
        ours = [hit.id for hit in docs.search(question, top_k=5)]
        theirs = [hit.id for hit in shared.search(question, top_k=5)]
        differing += ours != theirs
    assert differing <= len(asked) // 50, f"{differing} of {len(asked)} top-5 lists differ (HNSW is approximate)"
