"""The factories the plugin registers: retrievers by store, the default embedding model's folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from enigma.errors import NotAvailableError


def sqlite_retriever(*, collection: str, storage: Path, embedder: Any = None) -> Any:
    """The embedded retriever: the collection in ``storage``/collection.sqlite."""
    from enigma_rag.retriever import VectorRetriever

    return VectorRetriever(collection=collection, storage=storage, embedder=embedder)


def pgvector_retriever(*, collection: str, storage: Path, embedder: Any = None) -> Any:
    """The collection in the PostgreSQL database ``[plugins.rag] store`` names (``storage`` is unused)."""
    from enigma_rag.pg_store import PostgresStore
    from enigma_rag.retriever import VectorRetriever
    from enigma_rag.settings import is_postgres, store_url

    url = store_url(None)
    if not is_postgres(url):
        raise NotAvailableError("the pgvector retriever needs a database: enigma config set plugins.rag.store "
                                "postgres://USER:PASSWORD@HOST/DB")
    return VectorRetriever(collection=collection, store=PostgresStore(url, collection), embedder=embedder)
