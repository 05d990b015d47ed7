"""Serving throughput: enigma's engine vs transformers on the same workload.

A ~110M-parameter random Llama (fp32), 64 requests with prompt lengths
16–512 and output lengths 16–256 (seeded), greedy, same threads, same run.

Sections (all by default; pick with --only):
  throughput   generated tokens/s: enigma (all 64 at once) vs transformers
               request by request and in static padded batches of 16
  memory       KV utilisation (live tokens ÷ reserved slots), paged vs contiguous
  latency      a 16-token request submitted while 15 long ones decode
  prefix       32 requests sharing a 400-token system prompt, prefix caching on/off

    python benchmarks/throughput.py [--threads 2] [--requests 64] [--only throughput,prefix]
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from common import make_bench_model, parameters

from enigma import LLM, SamplingParams


def workload(count: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(7, 32000) for _ in range(rng.randint(16, 512))], rng.randint(16, 256))
            for _ in range(count)]


def params_for(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def enigma_throughput(llm: LLM, requests) -> float:
    start = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], [params_for(m) for _, m in requests])
    elapsed = time.perf_counter() - start
    assert sum(len(o.outputs[0].token_ids) for o in outputs) == sum(m for _, m in requests)
    return sum(m for _, m in requests) / elapsed


def hf_one_by_one(hf, requests) -> float:
    start = time.perf_counter()
    for prompt, max_tokens in requests:
        with torch.inference_mode():
            hf.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                        do_sample=False, pad_token_id=1)
    return sum(m for _, m in requests) / (time.perf_counter() - start)


def hf_static_batches(hf, requests, batch: int = 16) -> float:
    start = time.perf_counter()
    for index in range(0, len(requests), batch):
        group = requests[index:index + batch]
        width = max(len(p) for p, _ in group)
        ids = torch.tensor([[1] * (width - len(p)) + p for p, _ in group])           # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in group])
        longest = max(m for _, m in group)                                           # a static batch runs
        with torch.inference_mode():                                                 # until its longest ends
            hf.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                        do_sample=False, pad_token_id=1)
    return sum(m for _, m in requests) / (time.perf_counter() - start)


def kv_utilisation(folder, requests, cache: str) -> float:
    """Mean over steps of live tokens ÷ reserved token slots."""
    llm = LLM(folder, cache=cache, enable_prefix_caching=False, max_num_seqs=len(requests))
    engine = llm.engine
    for prompt, max_tokens in requests:
        engine.add_request(None, prompt, params_for(max_tokens))
    ratios = []
    while engine.has_unfinished():
        engine.step()
        running = engine.scheduler.running
        reserved = engine.cache.num_used_blocks * engine.cache.block_size
        if reserved:
            ratios.append(sum(r.num_computed_tokens for r in running) / reserved)
    return sum(ratios) / len(ratios)


def short_request_latency(folder) -> None:
    rng = random.Random(1)
    llm = LLM(folder)
    engine = llm.engine
    long_ids = [engine.add_request(None, [rng.randrange(7, 32000) for _ in range(256)], params_for(256))
                for _ in range(15)]
    for _ in range(3):
        engine.step()
    submitted = time.perf_counter()
    short = engine.add_request(None, [rng.randrange(7, 32000) for _ in range(16)], params_for(16))
    finished: dict[str, float] = {}
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = time.perf_counter() - submitted
    first_long = min(finished[i] for i in long_ids)
    print(f"latency: 16-token request done after {finished[short]:.1f} s; first of 15 long ones after "
          f"{first_long:.1f} s -> {'before' if finished[short] < first_long else 'AFTER'} all of them")


def prefix_caching(folder) -> None:
    rng = random.Random(2)
    system = [rng.randrange(7, 32000) for _ in range(400)]
    prompts = [system + [rng.randrange(7, 32000) for _ in range(16)] for _ in range(32)]
    rates = {}
    for enabled in (False, True):
        llm = LLM(folder, enable_prefix_caching=enabled)
        start = time.perf_counter()
        llm.generate(prompts, params_for(32))
        rates[enabled] = 32 * 32 / (time.perf_counter() - start)
        hit = llm.engine.stats()["prefix_cache_hit_rate"]
        print(f"prefix caching {'on ' if enabled else 'off'}: {rates[enabled]:6.1f} tok/s, hit rate {hit:.1%}")
    print(f"ratio prefix caching on/off: {rates[True] / rates[False]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--only", default="throughput,memory,latency,prefix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections = set(args.only.split(","))

    folder = make_bench_model()
    requests = workload(args.requests)
    print(f"model: random Llama, {parameters(folder) / 1e6:.0f}M parameters, fp32; threads: {args.threads}; "
          f"{len(requests)} requests, prompts 16-512, outputs 16-256 ({sum(m for _, m in requests)} tokens)")

    if "throughput" in sections:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ours = enigma_throughput(LLM(folder, max_num_seqs=len(requests)), requests)
        print(f"throughput: enigma {ours:.1f} tok/s", flush=True)
        batched = hf_static_batches(hf, requests)
        print(f"throughput: transformers static batches of 16 {batched:.1f} tok/s", flush=True)
        single = hf_one_by_one(hf, requests)
        print(f"throughput: transformers one by one {single:.1f} tok/s", flush=True)
        print(f"ratio enigma/transformers: {ours / single:.2f}x one by one, {ours / batched:.2f}x static batches")
    if "memory" in sections:
        paged = kv_utilisation(folder, requests, "paged")
        contiguous = kv_utilisation(folder, requests, "contiguous")
        print(f"KV utilisation (live tokens / reserved slots): paged {paged:.2f}, contiguous {contiguous:.2f}")
    if "latency" in sections:
        short_request_latency(folder)
    if "prefix" in sections:
        prefix_caching(folder)


if __name__ == "__main__":
    main()
