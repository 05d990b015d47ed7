"""enigma's cuda-paged backend vs transformers on one GPU: a random 1.1B Llama (TinyLlama's shape) in bf16.

    python benchmarks/gpu.py                 # on a CUDA machine; results also in $OUT/gpu.json (default /tmp)

Measures, in one run: the GPU's read bandwidth and from it the batch-1 decode limit (bytes of weights a
step reads); batch-1 prefill of 128 tokens and decode rate for enigma (with async scheduling and without)
and transformers; batch-1 decode after 2,000 tokens with the keys split across programs and without, and
with an fp8 KV cache; 256 requests (prompts 16-512 tokens, outputs 16-256, seeded) through enigma's
continuous batching against
transformers' static batches of 64; and time to first token and inter-token latency of 64 concurrent
streams through ``enigma serve``. The shapes are those of ``../shared/anchors/gpu_bench.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
OUT = Path(os.environ.get("OUT", "/tmp"))
RESULTS: dict[str, object] = {}
TINYLLAMA = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 4096,
             "tie_word_embeddings": False}


def note(key: str, value: object) -> None:
    RESULTS[key] = value
    print(json.dumps({key: value}), flush=True)
    (OUT / "gpu.json").write_text(json.dumps(RESULTS, indent=1))


def read_bandwidth() -> float:
    """Bytes per second of a streaming read of 4 GiB (a sum over it)."""
    data = torch.empty(2 << 30, dtype=torch.bfloat16, device="cuda").uniform_()
    for _ in range(3):
        data.sum()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        data.sum()
    torch.cuda.synchronize()
    return 10 * data.numel() * 2 / (time.perf_counter() - started)


def make_model(folder: Path, layers: int):
    import transformers
    from tiny_models import write_tokenizer

    write_tokenizer(folder)
    config = transformers.LlamaConfig(**{**TINYLLAMA, "num_hidden_layers": layers}, bos_token_id=0,
                                      eos_token_id=1, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(folder)
    return model


def best_of(run, tokens: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        run(tokens)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


async def stream(client, body: dict) -> dict:
    """One streamed completion: time to first token and the gaps between the following ones."""
    started = time.perf_counter()
    stamps = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if (line.startswith("data: ") and line != "data: [DONE]"
                    and any(choice["text"] for choice in json.loads(line[6:]).get("choices", []))):
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - started, "gaps": [b - a for a, b in itertools.pairwise(stamps)]}


async def concurrent_streams(base: str, count: int) -> dict:
    import httpx

    rng = random.Random(2)
    words = ["list", "tuple", "dict", "set", "yield", "import", "class", "def", "with", "lambda"]
    bodies = [{"model": "bench", "prompt": " ".join(rng.choice(words) for _ in range(rng.randint(16, 256))),
               "max_tokens": 128, "temperature": 0, "ignore_eos": True, "stream": True} for _ in range(count)]
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=count + 4)) as client:
        results = await asyncio.gather(*(stream(client, body) for body in bodies))
    ttfts = sorted(r["ttft"] for r in results)
    gaps = sorted(gap for r in results for gap in r["gaps"])
    return {"ttft_p50_ms": round(1e3 * statistics.median(ttfts), 1),
            "ttft_p99_ms": round(1e3 * ttfts[int(0.99 * (len(ttfts) - 1))], 1),
            "itl_p50_ms": round(1e3 * statistics.median(gaps), 2),
            "itl_p99_ms": round(1e3 * gaps[int(0.99 * (len(gaps) - 1))], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (22: TinyLlama)")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--skip-serve", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA device (torch.cuda.is_available() is false)")
    from enigma import LLM, SamplingParams

    note("device", torch.cuda.get_device_name(0))
    note("versions", {"torch": torch.__version__, "cuda": torch.version.cuda,
                      "triton": __import__("triton").__version__})
    bandwidth = read_bandwidth()
    note("read_bandwidth_GBps", round(bandwidth / 1e9))

    folder = Path(tempfile.mkdtemp(prefix="enigma-gpu-bench-"))
    reference = make_model(folder, args.layers)
    parameters = sum(p.numel() for p in reference.parameters())
    step_bytes = (parameters - TINYLLAMA["vocab_size"] * TINYLLAMA["hidden_size"]) * 2  # the embedding is a lookup
    limit = bandwidth / step_bytes
    note("parameters_M", round(parameters / 1e6))
    note("b1_limit_tok_s", round(limit))

    llm = LLM(folder, backend="cuda-paged", dtype="bfloat16", enable_prefix_caching=False, max_num_seqs=256,
              max_num_batched_tokens=4096)
    note("backend", llm.backend.name)
    prompt = [random.Random(0).randrange(7, 300) for _ in range(128)]
    new_tokens = 256

    def enigma_run(count: int) -> list[int]:
        params = SamplingParams(temperature=0, max_tokens=count, ignore_eos=True)
        return llm.generate([prompt], params)[0].outputs[0].token_ids

    def transformers_run(count: int) -> list[int]:
        with torch.inference_mode():
            out = reference.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=count,
                                     min_new_tokens=count, do_sample=False, pad_token_id=1)
        return out[0, len(prompt):].tolist()

    for run in (enigma_run, transformers_run):
        run(4)
    note("b1_greedy_32_identical", enigma_run(32) == transformers_run(32))
    for name, run in (("enigma", enigma_run), ("transformers", transformers_run)):
        prefill = best_of(run, 1)
        decode = (new_tokens - 1) / (best_of(run, new_tokens) - prefill)
        note(f"b1_{name}", {"prefill128_ms": round(prefill * 1e3, 1), "decode_tok_s": round(decode, 1),
                            "of_limit": round(decode / limit, 3)})

    # async scheduling off, same engine: what queueing the next decode ahead of the host's work gives
    llm.engine.async_scheduling = False
    sync_rate = (new_tokens - 1) / (best_of(enigma_run, new_tokens) - best_of(enigma_run, 1))
    llm.engine.async_scheduling = True
    note("b1_enigma_one_step_at_a_time", {"decode_tok_s": round(sync_rate, 1), "of_limit": round(sync_rate / limit, 3)})

    # a long history at batch 1: 4 KV heads are 4 programs unless the keys are split (flash-decoding)
    long_prompt = [random.Random(3).randrange(7, 32000) for _ in range(2000)]

    def long_run(count: int, engine=None) -> list[int]:
        params = SamplingParams(temperature=0, max_tokens=count, ignore_eos=True)
        return (engine or llm).generate([long_prompt], params)[0].outputs[0].token_ids

    def decode_rate(run, count: int = 128) -> float:
        prefill = best_of(run, 1)
        return (count - 1) / (best_of(run, count) - prefill)

    from enigma_cuda_paged import graphs as cuda_graphs
    from enigma_cuda_paged import kernels as cuda_kernels

    split_rate, split_tokens = decode_rate(long_run), long_run(32)
    found = cuda_kernels.multiprocessors
    cuda_kernels.multiprocessors = cuda_graphs.multiprocessors = lambda device: None   # never split
    llm.engine.runner.step_runner.reset()
    whole_rate, whole_tokens = decode_rate(long_run), long_run(32)
    cuda_kernels.multiprocessors = cuda_graphs.multiprocessors = found
    llm.engine.runner.step_runner.reset()
    note("b1_history2000", {"split_tok_s": round(split_rate, 1), "unsplit_tok_s": round(whole_rate, 1),
                            "speedup": round(split_rate / whole_rate, 2), "same_tokens": split_tokens == whole_tokens})
    bf16_blocks = llm.engine.num_blocks

    rng = random.Random(1)
    requests = [([rng.randrange(7, 32000) for _ in range(rng.randint(16, 512))], rng.randint(16, 256))
                for _ in range(args.requests)]
    total = sum(count for _, count in requests)
    torch.cuda.synchronize()
    started = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests],
                           [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in requests])
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    assert sum(len(o.outputs[0].token_ids) for o in outputs) == total
    enigma_rate = total / elapsed
    note(f"throughput_{args.requests}_enigma", {"tok_s": round(enigma_rate), "s": round(elapsed, 1),
                                                 "follow_on_steps": llm.engine.follow_on_steps})

    started = time.perf_counter()
    for first in range(0, len(requests), 64):
        group = requests[first:first + 64]
        width = max(len(p) for p, _ in group)
        ids = torch.tensor([[1] * (width - len(p)) + p for p, _ in group], device="cuda")
        mask = (ids != 1).long()
        count = max(m for _, m in group)
        with torch.inference_mode():
            reference.generate(ids, attention_mask=mask, max_new_tokens=count, min_new_tokens=count,
                               do_sample=False, pad_token_id=1)
    torch.cuda.synchronize()
    static_rate = total / (time.perf_counter() - started)
    note(f"throughput_{args.requests}_transformers_static64", {"tok_s": round(static_rate),
                                                              "enigma_ratio": round(enigma_rate / static_rate, 2)})
    llm = reference = None  # free the GPU for the next engine
    gc.collect()
    torch.cuda.empty_cache()

    os.environ["ENIGMA_PLUGINS__CUDA_PAGED__KV_CACHE_DTYPE"] = "fp8"
    fp8 = LLM(folder, backend="cuda-paged", dtype="bfloat16", enable_prefix_caching=False)
    fp8_rate = decode_rate(lambda count: long_run(count, fp8))
    note("fp8_kv", {"b1_history2000_tok_s": round(fp8_rate, 1), "vs_bf16_kv": round(fp8_rate / split_rate, 2),
                    "pool_blocks": fp8.engine.num_blocks, "bf16_pool_blocks": bf16_blocks})
    del os.environ["ENIGMA_PLUGINS__CUDA_PAGED__KV_CACHE_DTYPE"]
    fp8 = None  # free the GPU for the server
    gc.collect()
    torch.cuda.empty_cache()

    if not args.skip_serve:
        from serving import ENIGMA, launch, stop

        home = Path(tempfile.mkdtemp(prefix="enigma-gpu-home-"))
        env = {**os.environ, "ENIGMA_HOME": str(home)}
        import subprocess

        subprocess.run([str(ENIGMA), "pull", str(folder), "--name", "bench"], env=env, check=True,
                       capture_output=True)
        process, base = launch(env, "bench", "--backend", "cuda-paged", log_path=home / "server.log")
        try:
            asyncio.run(concurrent_streams(base, 4))  # warm-up: kernels compiled, graphs captured
            note(f"serve_{args.streams}_streams", asyncio.run(concurrent_streams(base, args.streams)))
        finally:
            stop(process)
    note("done", True)


if __name__ == "__main__":
    main()
