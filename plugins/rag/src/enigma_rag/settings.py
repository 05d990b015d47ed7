"""``[plugins.rag]``: where collections live, how documents are cut and searched."""

from __future__ import annotations

import attrs

from enigma.config import setting


def is_postgres(store: str) -> bool:
    """Whether ``store`` names a PostgreSQL database (else collections live in SQLite files)."""
    return store.startswith(("postgres://", "postgresql://"))


def _store_ok(value: str) -> bool:
    return value in ("", "sqlite") or is_postgres(value)


@attrs.define
class RAGSettings:
    store: str = setting("", allowed="empty (SQLite files in the data dir) or a postgres:// URL",
                         check=_store_ok,
                         doc="where collections live: SQLite in the data dir, or PostgreSQL with pgvector")
    embedding_model: str = setting("all-minilm-l6-v2", allowed="a model name or folder", check=bool,
                                   doc="the embedding model new collections use")
    answer_model: str = setting("enigma-tiny", allowed="a model name or folder", check=bool,
                                doc="the model that answers `enigma rag query` and Collection.query()")
    chunk_tokens: int = setting(160, allowed="an integer from 16 to 8192", check=lambda v: 16 <= v <= 8192,
                                doc="the longest passage, in the embedding model's tokens")
    chunk_overlap: int = setting(32, allowed="an integer of at least 0", check=lambda v: v >= 0,
                                 doc="tokens a passage repeats from the one before it")
    top_k: int = setting(4, allowed="an integer from 1 to 100", check=lambda v: 1 <= v <= 100,
                         doc="passages retrieved for an answer")
    score_threshold: float = setting(0.25, allowed="a number from -1 to 1", check=lambda v: -1 <= v <= 1,
                                     doc="the least cosine similarity a passage needs to be used")
    max_file_mb: float = setting(100.0, allowed="a positive number", check=lambda v: v > 0,
                                 doc="files larger than this (MB) are refused")


def rag_settings() -> RAGSettings:
    """The effective ``[plugins.rag]`` settings; the defaults when the plugin is not registered (its
    modules used directly, or ``ENIGMA_DISABLE_PLUGINS=rag``)."""
    from enigma.config import plugin_settings
    from enigma.errors import NotFoundError

    try:
        return plugin_settings("rag")
    except NotFoundError:
        return RAGSettings()


def store_url(store: str | None) -> str:
    """``store``, or the configured one when None."""
    return rag_settings().store if store is None else store
