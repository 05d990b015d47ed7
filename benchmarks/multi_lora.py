"""Multi-LoRA serving: one batch of requests over 4 adapters vs the base model alone — generated tokens/s.

The ~110M benchmark Llama (fp32); four random rank-16 adapters on q/k/v/o;
``--requests`` prompts of 64–192 tokens answering 32–64 tokens (seeded),
greedy, all submitted at once. Runs the base model with no adapters loaded,
then the same requests spread round-robin over the four adapters on a model
loaded with them (each adapter's rows go through its own pair of matmuls
inside the one batch), interleaved, best of ``--repeats``.

    python benchmarks/multi_lora.py [--threads 2] [--requests 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from common import make_bench_model

from enigma import LLM, SamplingParams


def make_adapters(base: Path, root: Path, count: int, rank: int) -> dict[str, Path]:
    from tiny_models import make_random_adapter

    return {f"adapter{index}": make_random_adapter(base, root / f"adapter{index}", rank=rank, seed=index, scale=0.02,
                                                   targets=["q_proj", "k_proj", "v_proj", "o_proj"])
            for index in range(count)}


def run(llm: LLM, requests, adapters) -> float:
    start = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
                                                      for _, m in requests], adapter=adapters)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="enigma-multi-lora-"))
    base = make_bench_model(root / "base")
    adapters = make_adapters(base, root, 4, args.rank)
    rng = random.Random(0)
    requests = [([rng.randrange(7, 32000) for _ in range(rng.randint(64, 192))], rng.randint(32, 64))
                for _ in range(args.requests)]
    names = [f"adapter{i % 4}" for i in range(args.requests)]
    plain = LLM(base, dtype="float32", enable_prefix_caching=False)
    served = LLM(base, dtype="float32", adapters=adapters, max_loras=4, enable_prefix_caching=False)
    run(plain, requests[:2], None)
    run(served, requests[:2], names[:2])
    best = {"base": 0.0, "4 adapters": 0.0}
    for _ in range(args.repeats):
        best["base"] = max(best["base"], run(plain, requests, None))
        best["4 adapters"] = max(best["4 adapters"], run(served, requests, names))
    print(f"{args.requests} requests, 4 adapters of rank {args.rank} on q/k/v/o round-robin, {args.threads} threads, "
          f"best of {args.repeats}")
    for name, value in best.items():
        print(f"{name:11s} {value:7.1f} generated tok/s")
    print(f"4 adapters / base: {best['4 adapters'] / best['base']:.2f}x")


if __name__ == "__main__":
    main()
