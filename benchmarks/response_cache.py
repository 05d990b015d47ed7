"""The response cache through `enigma serve`: a hit against a miss, and a repeated workload with the
cache on and off.

    python benchmarks/response_cache.py        # --requests 200 --distinct 20 --concurrency 8

Starts real servers on enigma-tiny (each its own ENIGMA_HOME): one with the cache off, one with it in
memory, one with it in Redis only (a real redis-server on a free port, as replicas share it). Then:

1. latency: ``--samples`` distinct greedy chats (max_tokens 32), each asked twice of each cached server —
   the first is a miss (generated), the second a hit — and once of the uncached server; medians;
2. throughput: ``--requests`` chats drawn (seeded) from ``--distinct`` prompts, ``--concurrency`` clients,
   against the server with the cache off and the one with it in memory; requests/s and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from services import RedisServer  # noqa: E402
from serving import launch, stop  # noqa: E402

TOPICS = ["lists", "tuples", "dictionaries", "sets", "generators", "decorators", "context managers", "classes",
          "modules", "exceptions", "iterators", "closures", "coroutines", "type hints", "dataclasses",
          "f-strings", "slicing", "comprehensions", "lambdas", "recursion", "sorting", "files", "regular "
          "expressions", "unit tests", "packages"]


def body(question: str) -> dict:
    return {"model": "enigma-tiny", "messages": [{"role": "user", "content": question}], "max_tokens": 32,
            "temperature": 0, "ignore_eos": True}


def ask(client: httpx.Client, question: str) -> tuple[float, str]:
    started = time.perf_counter()
    reply = client.post("/v1/chat/completions", json=body(question))
    reply.raise_for_status()
    return time.perf_counter() - started, reply.headers.get("x-enigma-cache", "off")


async def workload(base: str, questions: list[str], concurrency: int) -> float:
    queue = list(questions)

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            reply = await client.post("/v1/chat/completions", json=body(queue.pop()))
            reply.raise_for_status()

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return len(questions) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--distinct", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        redis = RedisServer(scratch)
        redis.start()
        servers = {}
        settings = {"off": {}, "memory": {"LEVELS": "memory"},
                    "redis": {"LEVELS": "redis", "REDIS_URL": redis.url}}
        try:
            for name, values in settings.items():
                home = scratch / name
                env = {**os.environ, "ENIGMA_HOME": str(home)}
                if values:
                    env["ENIGMA_PLUGINS__CACHE__ENABLED"] = "true"
                    env.update({f"ENIGMA_PLUGINS__CACHE__{key}": value for key, value in values.items()})
                home.mkdir()
                servers[name] = launch(env, "enigma-tiny", log_path=home / "server.log")
            for _, base in servers.values():  # warm up: kernels built, first-request costs paid
                with httpx.Client(base_url=base, timeout=300) as client:
                    for index in range(3):
                        ask(client, f"warm-up {index}")

            latency: dict[str, list[float]] = {"uncached": [], "memory miss": [], "memory hit": [],
                                               "redis miss": [], "redis hit": []}
            for index in range(args.samples):
                question = f"({index}) Explain {TOPICS[index % len(TOPICS)]} in Python."
                with httpx.Client(base_url=servers["off"][1], timeout=300) as client:
                    latency["uncached"].append(ask(client, question)[0])
                for name in ("memory", "redis"):
                    with httpx.Client(base_url=servers[name][1], timeout=300) as client:
                        miss, state = ask(client, question)
                        assert state == "miss", state
                        hit, state = ask(client, question)
                        assert state == "hit", state
                    latency[f"{name} miss"].append(miss)
                    latency[f"{name} hit"].append(hit)
            print(f"latency, median of {args.samples} greedy chats of 32 tokens (enigma-tiny):")
            medians = {name: statistics.median(values) * 1000 for name, values in latency.items()}
            for name, value in medians.items():
                print(f"  {name:<12} {value:8.2f} ms")
            for name in ("memory", "redis"):
                print(f"  {name} hit is {medians[f'{name} miss'] / medians[f'{name} hit']:.1f}x faster than "
                      f"its miss")

            rng = random.Random(0)
            distinct = [f"[{index}] Show an example of {TOPICS[index % len(TOPICS)]}." for index in
                        range(args.distinct)]
            questions = [rng.choice(distinct) for _ in range(args.requests)]
            off = asyncio.run(workload(servers["off"][1], questions, args.concurrency))
            on = asyncio.run(workload(servers["memory"][1], questions, args.concurrency))
            print(f"repeated workload: {args.requests} requests over {args.distinct} prompts, "
                  f"{args.concurrency} clients")
            print(f"  cache off  {off:8.1f} requests/s")
            print(f"  cache on   {on:8.1f} requests/s  ({on / off:.1f}x)")
        finally:
            for process, _ in servers.values():
                stop(process)
            redis.stop()


if __name__ == "__main__":
    main()
