"""The response cache in `enigma serve`, through the openai SDK: replicas sharing a real Redis, API keys,
streams replayed chunk for chunk, Redis killed and started again mid-run, semantic hits, corrupt entries."""

from __future__ import annotations

import os
import subprocess
import time

import httpx
import pytest
from serving import ENIGMA, launch, stop


def cache_env(home, **settings):
    env = {**os.environ, "ENIGMA_HOME": str(home), "ENIGMA_PLUGINS__CACHE__ENABLED": "true"}
    env.update({f"ENIGMA_PLUGINS__CACHE__{key.upper()}": str(value) for key, value in settings.items()})
    return env


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, redis_server):
    """Two servers sharing one Redis and one set of API keys (alice, bob): ``a`` keeps answers in memory,
    on disk and in Redis; ``b`` in Redis only, and tries it again every 0.3 s when it is down."""
    home = tmp_path_factory.mktemp("cache-home")
    env = {**os.environ, "ENIGMA_HOME": str(home)}
    keys = {name: subprocess.run([str(ENIGMA), "keys", "create", name], env=env, check=True, capture_output=True,
                                 text=True).stdout.strip() for name in ("alice", "bob")}
    if redis_server.process is None:
        redis_server.start()
    a, base_a = launch(cache_env(home, levels="memory,disk,redis", redis_url=redis_server.url,
                                 directory=home / "disk-a"), "enigma-tiny", log_path=home / "a.log")
    b, base_b = launch(cache_env(home, levels="redis", redis_url=redis_server.url, redis_retry_s=0.3),
                       "enigma-tiny", log_path=home / "b.log")
    yield {"a": base_a, "b": base_b, "keys": keys, "home": home}
    stop(a)
    stop(b)


def client(base, key):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


def chat(base, key, content, **options):
    raw = client(base, key).chat.completions.with_raw_response.create(
        model="enigma-tiny", messages=[{"role": "user", "content": content}],
        **{"temperature": 0, "max_tokens": 16, **options})
    return raw.headers.get("x-enigma-cache"), raw.parse(), raw.headers


def streamed(base, key, content, **options):
    """The header and every chunk's (delta content, finish reason), and the usage chunk."""
    with client(base, key).chat.completions.with_streaming_response.create(
            model="enigma-tiny", messages=[{"role": "user", "content": content}], max_tokens=16, temperature=0,
            stream=True, stream_options={"include_usage": True}, **options) as response:
        state = response.headers.get("x-enigma-cache")
        chunks, usage = [], None
        for chunk in response.parse():
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
            for choice in chunk.choices:
                chunks.append((choice.delta.content, choice.finish_reason))
    return state, chunks, usage


def test_a_repeated_request_is_answered_from_the_cache(replicas):
    base, alice = replicas["a"], replicas["keys"]["alice"]
    state, first, _ = chat(base, alice, "Write a function that adds two numbers.")
    assert state == "miss"
    state, second, headers = chat(base, alice, "Write a function that adds two numbers.")
    assert state == "hit" and headers["x-enigma-cache-level"] == "memory"
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.choices[0].finish_reason == first.choices[0].finish_reason
    assert second.usage.completion_tokens == first.usage.completion_tokens
    assert second.id != first.id


def test_a_cached_stream_replays_the_original_chunk_for_chunk(replicas):
    base, alice = replicas["a"], replicas["keys"]["alice"]
    state, original, usage = streamed(base, alice, "Explain what a list is.")
    assert state == "miss" and len(original) > 3
    state, replayed, replayed_usage = streamed(base, alice, "Explain what a list is.")
    assert state == "hit"
    assert replayed == original
    assert replayed_usage == usage
    # the stream's answer also answers the same request without streaming
    state, whole, _ = chat(base, alice, "Explain what a list is.")
    assert state == "hit"
    assert whole.choices[0].message.content == "".join(text or "" for text, _ in original)


def test_completions_are_cached(replicas):
    openai = client(replicas["a"], replicas["keys"]["alice"])
    answers = [openai.completions.with_raw_response.create(model="enigma-tiny", prompt="def add(a, b):",
                                                           max_tokens=12, temperature=0) for _ in range(2)]
    assert [raw.headers["x-enigma-cache"] for raw in answers] == ["miss", "hit"]
    assert answers[0].parse().choices[0].text == answers[1].parse().choices[0].text


def test_sampled_requests_bypass_the_cache_and_seeded_ones_use_it(replicas):
    base, alice = replicas["a"], replicas["keys"]["alice"]
    assert chat(base, alice, "Tell me a story.", temperature=0.8)[0] == "bypass"
    assert chat(base, alice, "Tell me a story.", temperature=0.8)[0] == "bypass"
    seeded = [chat(base, alice, "Tell me a story.", temperature=0.8, seed=7) for _ in range(2)]
    assert [state for state, _, _ in seeded] == ["miss", "hit"]
    assert seeded[0][1].choices[0].message.content == seeded[1][1].choices[0].message.content
    assert chat(base, alice, "Tell me a story.", temperature=0.8, seed=8)[0] == "miss"


def test_callers_can_skip_or_refresh_the_cache(replicas):
    base, alice = replicas["a"], replicas["keys"]["alice"]
    question = "What does a compiler do?"
    assert chat(base, alice, question)[0] == "miss"
    assert chat(base, alice, question, extra_body={"cache": False})[0] == "bypass"
    assert chat(base, alice, question, extra_headers={"Cache-Control": "no-store"})[0] == "bypass"
    assert chat(base, alice, question, extra_headers={"Cache-Control": "no-cache"})[0] == "miss"
    assert chat(base, alice, question)[0] == "hit"
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="cache"):
        chat(base, alice, question, extra_body={"cache": {"ttl": -1}})


def test_one_api_key_never_gets_another_keys_answer(replicas):
    base, keys = replicas["a"], replicas["keys"]
    assert chat(base, keys["alice"], "My secret question")[0] == "miss"
    assert chat(base, keys["bob"], "My secret question")[0] == "miss"
    assert chat(base, keys["alice"], "My secret question")[0] == "hit"
    assert chat(replicas["b"], keys["bob"], "My secret question")[0] == "hit"  # bob's own, from Redis


def test_replicas_share_answers_through_redis(replicas):
    keys = replicas["keys"]
    state, on_a, _ = chat(replicas["a"], keys["alice"], "Name three sorting algorithms.")
    assert state == "miss"
    state, on_b, headers = chat(replicas["b"], keys["alice"], "Name three sorting algorithms.")
    assert (state, headers["x-enigma-cache-level"]) == ("hit", "redis")
    assert on_b.choices[0].message.content == on_a.choices[0].message.content


def test_a_ttl_per_request(replicas):
    base, alice = replicas["a"], replicas["keys"]["alice"]
    ask = {"extra_body": {"cache": {"ttl": 1}}}
    assert [chat(base, alice, "Short-lived answer", **ask)[0] for _ in range(2)] == ["miss", "hit"]
    time.sleep(1.3)
    assert chat(base, alice, "Short-lived answer", **ask)[0] == "miss"


def metric(base, key, name):
    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {key}"}).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_redis_killed_and_started_again_mid_run(replicas, redis_server):
    base, alice = replicas["b"], replicas["keys"]["alice"]
    assert [chat(base, alice, "Before the outage")[0] for _ in range(2)] == ["miss", "hit"]
    redis_server.stop()
    try:
        states = [chat(base, alice, "During the outage")[0] for _ in range(3)]
        assert states == ["miss", "miss", "miss"]  # answered, uncached
        health = httpx.get(f"{base}/health/full", headers={"Authorization": f"Bearer {alice}"}).json()
        report = health["checks"]["cache"]
        assert report["status"] == "degraded" and report["levels"]["redis"]["status"] == "down"
        assert httpx.get(f"{base}/health").status_code == 200  # still alive: serving without the cache
        assert metric(base, alice, 'enigma:response_cache_errors_total{level="redis"}') >= 1
        assert metric(base, alice, 'enigma:response_cache_level_up{level="redis"}') == 0
    finally:
        redis_server.start()
    time.sleep(0.5)
    assert [chat(base, alice, "After the outage")[0] for _ in range(2)] == ["miss", "hit"]
    assert metric(base, alice, 'enigma:response_cache_level_up{level="redis"}') == 1
    log = (replicas["home"] / "b.log").read_text()
    assert log.count("is unreachable") == 1 and "answers again" in log


@pytest.fixture(scope="module")
def semantic_server(tmp_path_factory):
    """A server keeping answers on disk only, with the semantic cache (all-MiniLM-L6-v2) on."""
    home = tmp_path_factory.mktemp("semantic-home")
    process, base = launch(cache_env(home, levels="disk", directory=home / "disk", semantic="true",
                                     semantic_threshold=0.9), "enigma-tiny", log_path=home / "server.log")
    yield base, home / "disk"
    stop(process)


def test_a_prompt_that_means_the_same_is_a_semantic_hit(semantic_server):
    base, _ = semantic_server
    state, original, _ = chat(base, "unused", "What is the capital of France?")
    assert state == "miss"
    state, similar, headers = chat(base, "unused", "what is the capital city of France")
    assert (state, headers["x-enigma-cache-level"]) == ("hit", "semantic")
    assert 0.9 <= float(headers["x-enigma-cache-similarity"]) < 1
    assert similar.choices[0].message.content == original.choices[0].message.content
    assert chat(base, "unused", "How do I sort a list in Python?")[0] == "miss"
    # other options, other answers: a semantic hit needs the same max_tokens
    assert chat(base, "unused", "what is the capital city of France", max_tokens=5)[0] == "miss"


def test_a_corrupt_disk_entry_is_regenerated_not_served(semantic_server):
    import diskcache

    base, directory = semantic_server
    state, original, _ = chat(base, "unused", "Describe a binary tree.")
    assert state == "miss"
    with diskcache.Cache(str(directory)) as raw:
        for key in list(raw.iterkeys()):
            blob = raw[key]
            raw[key] = blob[:10] + bytes(len(blob) - 10)
    state, again, _ = chat(base, "unused", "Describe a binary tree.")
    assert state == "miss"
    assert again.choices[0].message.content == original.choices[0].message.content
    assert metric(base, "unused", "enigma:response_cache_corrupt_entries_total") >= 1
    assert chat(base, "unused", "Describe a binary tree.")[0] == "hit"


def test_hook_enigma_health(replicas):
    """The cache reports each level under /health/full's checks; an off cache reports nothing."""
    alice = replicas["keys"]["alice"]
    chat(replicas["a"], alice, "Health check question")
    report = httpx.get(f"{replicas['a']}/health/full", headers={"Authorization": f"Bearer {alice}"}).json()
    cache = report["checks"]["cache"]
    assert cache["status"] == "ok"
    assert set(cache["levels"]) == {"memory", "disk", "redis"}
    assert all(level["status"] == "ok" for level in cache["levels"].values())
    assert cache["levels"]["memory"]["entries"] >= 1 and cache["stats"]["misses"] >= 1


def test_an_off_cache_leaves_requests_alone(server):
    """The session's plain server (cache not enabled): no header, no check, yet 'cache' is still checked."""
    base = server[0]
    chat_body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    reply = httpx.post(f"{base}/v1/chat/completions", json=chat_body)
    assert reply.status_code == 200 and "x-enigma-cache" not in reply.headers
    assert "cache" not in httpx.get(f"{base}/health/full").json()["checks"]
    refused = httpx.post(f"{base}/v1/chat/completions", json={**chat_body, "cache": "yes"})
    assert refused.status_code == 400 and "'cache' must be" in refused.text
