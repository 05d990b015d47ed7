"""Fixtures of the RAG plugin's tests: the real all-MiniLM-L6-v2, files made on the spot, a real PostgreSQL."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def minilm():
    """The embedder of the default model (loaded once for the session, as the plugin shares it)."""
    from enigma_rag.embedders import embedder_for

    return embedder_for("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    """A PostgreSQL 16 with pgvector (the pgserver package ships both), on a Unix socket; stopped after."""
    pgserver = pytest.importorskip("pgserver", reason="pgserver (PostgreSQL + pgvector for tests) is not installed")
    pytest.importorskip("psycopg", reason="psycopg is not installed")
    folder = tmp_path_factory.mktemp("pg")
    server = pgserver.get_server(str(folder), cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()
    shutil.rmtree(folder, ignore_errors=True)
