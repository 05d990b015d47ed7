"""InferenceCache, the seed's Python API, on each level: hits, TTL, LRU by bytes, corruption, Redis faults."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from enigma_cache import InferenceCache

from enigma.errors import BadRequestError


@pytest.fixture(params=["memory", "disk", "redis", "memory,disk,redis"])
def cache(request, tmp_path):
    url = request.getfixturevalue("redis_url") if "redis" in request.param else None
    with InferenceCache(backend=request.param, url=url, directory=tmp_path / "disk", ttl=60) as opened:
        yield opened


def test_values_round_trip_and_miss_gives_the_default(cache):
    cache.set("answer", {"text": "42", "tokens": [1, 2, 3]})
    assert cache.get("answer") == {"text": "42", "tokens": [1, 2, 3]}
    assert "answer" in cache and "other" not in cache
    assert cache.get("other", "none") == "none"
    cache.delete("answer")
    assert cache.get("answer") is None
    assert (cache.stats()["hits"], cache.stats()["misses"]) == (2, 3)


def test_entries_expire_after_their_ttl(cache):
    cache.set("short", "soon gone", ttl=0.4)
    cache.set("long", "stays")
    assert cache.get("short") == "soon gone"
    time.sleep(0.6)
    assert cache.get("short") is None
    assert cache.get("long") == "stays"


def test_decorator_calls_the_function_once_per_arguments(cache):
    calls = []

    @cache.cached(ttl=30)
    def square(x, *, offset=0):
        calls.append(x)
        return x * x + offset

    assert [square(3), square(3), square(4), square(3, offset=1), square(3, offset=1)] == [9, 9, 16, 10, 10]
    assert calls == [3, 4, 3]
    square.cache_clear()
    assert square(3) == 9 and calls == [3, 4, 3, 3]


def test_decorator_on_async_functions(cache):
    calls = []

    @cache.cached()
    async def shout(text):
        calls.append(text)
        return text.upper()

    async def main():
        return [await shout("a"), await shout("a"), await shout("b")]

    assert asyncio.run(main()) == ["A", "A", "B"]
    assert calls == ["a", "b"]


def test_namespaces_keep_caches_apart(redis_url):
    with InferenceCache("redis", url=redis_url, namespace="one") as one, \
            InferenceCache("redis", url=redis_url, namespace="two") as two:
        one.set("k", "from one")
        assert two.get("k") is None
        two.set("k", "from two")
        assert one.get("k") == "from one"
        one.clear()
        assert one.get("k") is None and two.get("k") == "from two"


def test_memory_evicts_least_recently_used_by_bytes():
    import os

    cache = InferenceCache("memory", max_memory_mb=64 / 1024)  # 64 KiB; random values do not compress
    for name in "abc":
        cache.set(name, os.urandom(20_000))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.set("d", os.urandom(20_000))  # over 64 KiB: the least recently used (b) goes
    assert cache.get("b") is None
    assert all(cache.get(name) is not None for name in "acd")
    assert cache.status()["levels"]["memory"]["bytes"] <= 64 * 1024
    cache.set("huge", os.urandom(100_000))  # larger than the level: not kept, nothing else lost
    assert cache.get("huge") is None and cache.get("d") is not None


def test_a_hit_in_redis_fills_memory(redis_url):
    with InferenceCache("redis", url=redis_url, namespace="fill") as writer:
        writer.set("k", "v", ttl=30)
    with InferenceCache("memory,redis", url=redis_url, namespace="fill") as reader:
        assert reader.get("k") == "v"
        assert reader.get("k") == "v"
        assert reader.stats()["hits_by_level"] == {"memory": 1, "redis": 1}


def test_a_corrupt_disk_entry_is_dropped_not_served(tmp_path, caplog):
    import diskcache

    with InferenceCache("disk", directory=tmp_path) as cache:
        cache.set("k", "good value")
        with diskcache.Cache(str(tmp_path)) as raw:
            [stored_key] = list(raw.iterkeys())
            blob = raw[stored_key]
            raw[stored_key] = blob[:-3] + bytes(3)  # the last bytes damaged
        with caplog.at_level(logging.WARNING, logger="enigma.cache"):
            assert cache.get("k") is None
        assert "corrupt" in caplog.text
        assert cache.stats()["corrupt"] == 1
        with diskcache.Cache(str(tmp_path)) as raw:
            assert stored_key not in raw  # dropped, so the next write is clean
        cache.set("k", "good again")
        assert cache.get("k") == "good again"


def test_redis_killed_and_restarted_mid_run(redis_server, redis_url, caplog):
    with InferenceCache("memory,redis", url=redis_url, retry_s=0.3, namespace="fault") as cache:
        cache.set("before", 1)
        redis_server.stop()
        with caplog.at_level(logging.WARNING, logger="enigma.cache"):
            for attempt in range(20):  # no exception, however often it is asked
                cache.set(f"during-{attempt}", attempt)
                assert cache.get("missing") is None
        assert cache.get("before") == 1  # the memory level still answers
        assert cache.status()["status"] == "degraded"
        assert cache.status()["levels"]["redis"]["status"] == "down"
        assert caplog.text.count("is unreachable") == 1  # one warning for the outage
        redis_server.start()
        time.sleep(0.4)
        cache.set("after", 2)
        assert cache.status()["levels"]["redis"]["status"] == "ok"
    with InferenceCache("redis", url=redis_url, namespace="fault") as fresh:
        assert fresh.get("after") == 2  # written to Redis again, no restart
        assert fresh.get("during-3") is None


def test_redis_down_at_start(redis_server, tmp_path):
    from serving import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens
    with InferenceCache("redis", url=url) as cache:
        cache.set("k", "v")
        assert cache.get("k") is None
        assert cache.status()["levels"]["redis"]["status"] == "down"


def test_bad_options_are_refused():
    with pytest.raises(BadRequestError, match="memory, disk, redis"):
        InferenceCache("memcached")
    with pytest.raises(BadRequestError, match="ttl"):
        InferenceCache("memory", ttl=0)
    with pytest.raises(BadRequestError, match="non-empty strings"):
        InferenceCache("memory").get(42)
    cache = InferenceCache("memory")

    @cache.cached()
    def takes_a_lock(lock):
        return 1

    import threading

    with pytest.raises(BadRequestError, match="key="):
        takes_a_lock(threading.Lock())
