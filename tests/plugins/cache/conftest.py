"""A real redis-server on a free loopback port, which tests may kill and start again."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services import RedisServer, need


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    need("redis-server", "redis-server")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """A running, empty Redis (started again if a test stopped it)."""
    if redis_server.process is None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url
