"""compose.yaml's topology without containers: three `enigma serve` replicas sharing a Redis response
cache, behind HAProxy with the shipped config, scraped by Prometheus with the shipped config — all real
processes on loopback. Under 64 concurrent streams: every request answered, the load spread; one replica
killed mid-run: clients that retry succeed and the others are unaffected; the Grafana dashboard's every
query works against what Prometheus scraped."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services import ROOT, HAProxy, Prometheus, RedisServer, need, wait_until
from serving import launch, stop

STREAMS = 64


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    for program, package in (("redis-server", "redis-server"), ("haproxy", "haproxy"), ("prometheus", "prometheus")):
        need(program, package)
    home = tmp_path_factory.mktemp("topology")
    redis = RedisServer(home)
    redis.start()
    env = {**os.environ, "ENIGMA_HOME": str(home), "ENIGMA_PLUGINS__CACHE__ENABLED": "true",
           "ENIGMA_PLUGINS__CACHE__LEVELS": "memory,redis", "ENIGMA_PLUGINS__CACHE__REDIS_URL": redis.url}
    replicas = {}
    try:
        for index in range(3):
            process, base = launch(env, "enigma-tiny", log_path=home / f"enigma{index}.log")
            replicas[f"enigma{index}"] = (process, base)
        lb = HAProxy(home, {name: int(base.rsplit(":", 1)[1]) for name, (_, base) in replicas.items()})
        prometheus = Prometheus(home, [base.removeprefix("http://") for _, base in replicas.values()],
                                f"127.0.0.1:{lb.stats_port}")
    except BaseException:
        for process, _ in replicas.values():
            process.kill()
        redis.stop()
        raise
    yield {"lb": lb, "replicas": replicas, "prometheus": prometheus, "redis": redis, "home": home}
    prometheus.stop()
    lb.stop()
    for process, _ in replicas.values():
        if process.poll() is None:
            stop(process)
    redis.stop()


async def one_stream(client: httpx.AsyncClient, url: str, number: int, *, attempts: int = 1,
                     progress: Counter | None = None) -> dict:
    """A sampled chat (the cache stays out of it) streamed to the end; a broken stream is retried."""
    body = {"model": "enigma-tiny", "messages": [{"role": "user", "content": f"Request {number}: write a loop."}],
            "max_tokens": 24, "temperature": 0.9, "stream": True}
    tried = []
    for _ in range(attempts):
        replica = None
        try:
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                replica = response.headers.get("x-enigma-replica")
                response.raise_for_status()
                finish, done = None, False
                async for line in response.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            raise RuntimeError(chunk["error"]["message"])
                        finish = chunk["choices"][0]["finish_reason"] if chunk["choices"] else finish
                        if progress is not None:
                            progress[replica] += 1
                if not (done and finish):
                    raise RuntimeError("the stream ended early")
                return {"replica": replica, "tried": tried, "finish": finish}
        except (httpx.HTTPError, RuntimeError) as exc:
            tried.append((replica, f"{type(exc).__name__}: {exc}"))
    return {"replica": None, "tried": tried, "finish": None}


async def many_streams(url: str, count: int, *, attempts: int = 1, while_running=None) -> list[dict]:
    """``count`` concurrent streams; ``while_running(progress)`` runs beside them (chunks per replica)."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    progress: Counter = Counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(120), limits=limits) as client:
        tasks = [asyncio.create_task(one_stream(client, url, number, attempts=attempts, progress=progress))
                 for number in range(count)]
        if while_running is not None:
            await while_running(progress)
        return await asyncio.gather(*tasks)


def served_by(results: list[dict]) -> Counter:
    return Counter(result["replica"] for result in results)


def test_every_request_is_answered_and_the_load_is_spread(stack):
    results = asyncio.run(many_streams(stack["lb"].url, STREAMS))
    failed = [result for result in results if result["finish"] is None]
    assert not failed, failed[:3]
    shares = served_by(results)
    assert set(shares) == set(stack["replicas"]), shares
    assert max(shares.values()) <= STREAMS * 0.5, shares


def test_replicas_share_answers_through_redis(stack):
    body = {"model": "enigma-tiny", "messages": [{"role": "user", "content": "Cached through the balancer"}],
            "max_tokens": 12, "temperature": 0}
    replies = [httpx.post(f"{stack['lb'].url}/v1/chat/completions", json=body, timeout=60) for _ in range(4)]
    assert [reply.headers["x-enigma-cache"] for reply in replies] == ["miss", "hit", "hit", "hit"]
    assert len({reply.json()["choices"][0]["message"]["content"] for reply in replies}) == 1
    # each replica holds it in memory only after it answered once; the others found it in Redis
    levels = {reply.headers["x-enigma-replica"]: reply.headers["x-enigma-cache-level"] for reply in replies[1:]}
    first = replies[0].headers["x-enigma-replica"]
    assert all(level == "redis" for replica, level in levels.items() if replica != first)


def test_prometheus_scrapes_every_replica_and_the_dashboard_queries_work(stack):
    prometheus = stack["prometheus"]

    def scraped_all() -> bool:
        up = prometheus.query('up{job="enigma"} == 1')["data"]["result"]
        served = prometheus.query("sum by (instance) (enigma:request_success_total)")["data"]["result"]
        hits = prometheus.query("enigma:response_cache_hits_total")["data"]["result"]
        return len(up) == 3 and len(served) == 3 and bool(hits)

    wait_until(scraped_all, timeout=30, what="Prometheus' scrape of three replicas")
    asyncio.run(many_streams(stack["lb"].url, 6))  # traffic after the first scrapes: rates have data
    body = {"model": "enigma-tiny", "messages": [{"role": "user", "content": "Cached through the balancer"}],
            "max_tokens": 12, "temperature": 0}
    assert httpx.post(f"{stack['lb'].url}/v1/chat/completions", json=body).headers["x-enigma-cache"] == "hit"
    assert prometheus.query('up{job="haproxy"}')["data"]["result"][0]["value"][1] == "1"
    exported = set()
    for _, base in stack["replicas"].values():
        exported |= {line.split("{")[0].split(" ")[0] for line in httpx.get(f"{base}/metrics").text.splitlines()
                     if line and not line.startswith("#")}
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/enigma.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expression = target["expr"]
            for name in re.findall(r"enigma:[a-z0-9_]+", expression):
                assert name in exported, f"panel {panel['title']!r} queries {name}, which enigma does not export"
            reply = prometheus.query(expression)
            assert reply["status"] == "success", (panel["title"], reply)
            wait_until(lambda expression=expression: prometheus.query(expression)["data"]["result"], timeout=30,
                       what=f"data for panel {panel['title']!r} ({expression})")


def test_a_replica_killed_mid_run(stack):
    """Clients that retry succeed; requests on the other replicas never notice."""
    victim = "enigma1"
    process, _ = stack["replicas"][victim]

    async def kill_once_streams_run(progress: Counter) -> None:
        while progress[victim] < 20:  # its streams are under way
            await asyncio.sleep(0.01)
        process.send_signal(signal.SIGKILL)

    results = asyncio.run(many_streams(stack["lb"].url, STREAMS, attempts=3, while_running=kill_once_streams_run))
    assert process.wait(timeout=10) == -signal.SIGKILL
    assert all(result["finish"] is not None for result in results), [r for r in results if not r["finish"]][:3]
    interrupted = [result for result in results if result["tried"]]
    assert interrupted, "no stream was on the killed replica"
    assert all(replica in (victim, None) for result in interrupted for replica, _ in result["tried"]), interrupted
    assert all(result["replica"] != victim for result in interrupted)
    untouched = [result for result in results if not result["tried"]]
    assert len(untouched) >= STREAMS // 2
    # HAProxy's health check takes the dead replica out: new requests all succeed at once
    after = asyncio.run(many_streams(stack["lb"].url, 12))
    assert all(result["finish"] for result in after) and victim not in served_by(after)
