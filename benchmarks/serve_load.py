"""Load on `enigma serve`: concurrent streaming clients, disconnects, and a rate-limited client.

    python benchmarks/serve_load.py            # --model enigma-tiny --clients 64 --disconnects 16

Starts a real server (its own ENIGMA_HOME, two API keys), then:

1. serves every request one at a time (the baseline), greedy, recording the answers;
2. sends the same requests from ``--clients`` concurrent streaming clients (mixed prompt and
   output lengths, seeded) and checks each answer equals its solo answer token for token;
3. while that runs, a client whose key allows 5 requests/min keeps asking and gets 429s;
4. ``--disconnects`` clients drop their streams midway; afterwards no KV block may be in use.

Prints requests/s, generated tokens/s, p50/p99 time-to-first-token and the ratio of
concurrent to one-at-a-time throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from serving import ENIGMA, launch, stop  # noqa: E402

WORDS = ["the", "list", "type", "supports", "slicing", "while", "a", "tuple", "is", "immutable", "and",
         "dictionary", "maps", "keys", "to", "values", "generators", "yield", "items", "lazily", "modules",
         "group", "related", "code"]


def make_requests(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    requests = []
    for index in range(count):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 120)))
        requests.append({"model": "load", "prompt": f"{index}: {prompt}", "max_tokens": rng.randint(16, 128),
                         "temperature": 0, "ignore_eos": True, "stream": True})
    return requests


async def stream_one(client: httpx.AsyncClient, body: dict, headers: dict, *, drop_after: int | None = None
                     ) -> dict:
    """Stream one completion; the text, time to first token, and tokens (from the usage chunk)."""
    started = time.perf_counter()
    first = None
    text = []
    tokens = 0
    body = {**body, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            return {"status": response.status_code}
        seen = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice["text"] and first is None:
                    first = time.perf_counter() - started
                text.append(choice["text"])
                seen += 1
            if drop_after is not None and seen >= drop_after:
                return {"status": "dropped"}
    return {"status": 200, "text": "".join(text), "ttft": first, "tokens": tokens,
            "elapsed": time.perf_counter() - started}


async def scenario(base: str, keys: dict[str, str], *, clients: int, disconnects: int) -> dict:
    requests = make_requests(clients)
    main = {"Authorization": f"Bearer {keys['load']}"}
    limited = {"Authorization": f"Bearer {keys['limited']}"}
    timeout = httpx.Timeout(600.0)
    async with httpx.AsyncClient(base_url=base, timeout=timeout,
                                 limits=httpx.Limits(max_connections=clients + 8)) as client:
        solo_started = time.perf_counter()
        solo = [await stream_one(client, body, main) for body in requests]
        solo_elapsed = time.perf_counter() - solo_started

        async def limited_client() -> list[int]:
            statuses = []
            for _ in range(12):
                response = await client.get("/v1/models", headers=limited)
                statuses.append(response.status_code)
                await asyncio.sleep(0.05)
            return statuses

        concurrent_started = time.perf_counter()
        results, statuses = await asyncio.gather(
            asyncio.gather(*(stream_one(client, body, main) for body in requests)), limited_client())
        concurrent_elapsed = time.perf_counter() - concurrent_started

        drops = make_requests(disconnects, seed=1)
        for body in drops:
            body["max_tokens"] = 400
        await asyncio.gather(*(stream_one(client, body, main, drop_after=3) for body in drops))
        deadline = time.monotonic() + 10
        while True:
            engine = (await client.get("/health/full")).json()["models"]["load"]["engine"]
            if (engine["kv_blocks_used"] == 0 and engine["running"] == 0) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    mismatches = [i for i, (a, b) in enumerate(zip(solo, results)) if a.get("text") != b.get("text")]
    tokens = sum(r["tokens"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    return {
        "requests": clients, "all_ok": all(r["status"] == 200 for r in results), "mismatches": mismatches,
        "requests_per_s": clients / concurrent_elapsed, "tokens_per_s": tokens / concurrent_elapsed,
        "solo_tokens_per_s": sum(r["tokens"] for r in solo) / solo_elapsed,
        "ttft_p50": statistics.median(ttfts), "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "solo_ttft_p50": statistics.median(r["ttft"] for r in solo),
        "limited_statuses": statuses, "kv_blocks_used_after_disconnects": engine["kv_blocks_used"],
        "running_after_disconnects": engine["running"],
    }


def start_server(model: str, home: Path) -> tuple[subprocess.Popen, str, dict[str, str]]:
    env = {**os.environ, "ENIGMA_HOME": str(home)}
    subprocess.run([str(ENIGMA), "pull", model, "--name", "load"], env=env, check=True, capture_output=True)
    keys = {}
    for name, extra in (("load", []), ("limited", ["--rate-limit", "5/min"])):
        keys[name] = subprocess.run([str(ENIGMA), "keys", "create", name, *extra], env=env, check=True,
                                    capture_output=True, text=True).stdout.strip()
    process, base = launch(env, "load", log_path=home / "server.log")
    return process, base, keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="enigma-tiny", help="a store name, packaged model or folder")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--disconnects", type=int, default=16)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="enigma-load-"))
    process, base, keys = start_server(args.model, home)
    try:
        result = asyncio.run(scenario(base, keys, clients=args.clients, disconnects=args.disconnects))
    finally:
        stop(process)
    print(f"model {args.model}; {result['requests']} streaming clients, greedy, 16-128 new tokens each")
    print(f"all completed: {result['all_ok']}; answers differing from the solo run: {len(result['mismatches'])}")
    print(f"concurrent: {result['requests_per_s']:.2f} requests/s, {result['tokens_per_s']:.0f} tokens/s, "
          f"TTFT p50 {result['ttft_p50'] * 1000:.0f} ms, p99 {result['ttft_p99'] * 1000:.0f} ms")
    print(f"one at a time: {result['solo_tokens_per_s']:.0f} tokens/s, TTFT p50 "
          f"{result['solo_ttft_p50'] * 1000:.0f} ms -> concurrent/solo throughput "
          f"{result['tokens_per_s'] / result['solo_tokens_per_s']:.2f}x")
    statuses = result["limited_statuses"]
    print(f"rate-limited client (5/min): {statuses.count(200)} served, {statuses.count(429)} refused with 429")
    print(f"after {args.disconnects} mid-stream disconnects: {result['kv_blocks_used_after_disconnects']} KV blocks "
          f"in use, {result['running_after_disconnects']} requests running")


if __name__ == "__main__":
    main()
