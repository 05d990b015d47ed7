"""enigma vs llama.cpp on the same GGUF files: batch-1 decode, prefill, batched decode.

Models (random weights, ``../shared/anchors/llamacpp-bench`` shapes): a ~125M GQA Llama (hidden 768,
12 layers, 12 heads / 4 KV heads, FFN 2048, vocabulary 32,000, untied) and a ~15M one (hidden 192, 6
layers, 3 / 1 heads, FFN 512), each written by enigma as F32, Q8_0 and Q4_K_M GGUF files. llama.cpp is
llama-cpp-python 0.3.36 built from its sdist into the oracle cache (``tests/plugins/ggml/conftest.py``);
both use ``--threads`` threads. Rounds are interleaved (enigma, then llama.cpp, per file); medians.

- decode: a 32-token prompt of random ids, then 128 greedy tokens; tok/s = 127 / (time after the first
  token), the steady decode rate.
- prefill: one 512-token prompt (enigma: prefix caching off; llama.cpp: ``Llama.eval``), seconds.
- batch: ``--batch`` sequences of 32 prompt tokens decoding 64 tokens each through enigma's continuous
  batching; llama-cpp-python runs one sequence at a time, so its line is its batch-1 rate.

    python benchmarks/llamacpp.py [--rounds 3] [--threads 2] [--models 125m,15m] [--types F32,Q8_0,Q4_K_M]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "125m": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4,
             "intermediate_size": 2048},
    "15m": {"hidden_size": 192, "num_hidden_layers": 6, "num_attention_heads": 3, "num_key_value_heads": 1,
            "intermediate_size": 512},
}
PROMPT, NEW, IDS = 32, 128, 380


def make_files(work: Path, model: str, types: list[str]) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import make_bench_model
    from enigma_ggml import write_gguf

    folder = make_bench_model(work / model, tie_word_embeddings=False, **SHAPES[model])
    files = {}
    for file_type in types:
        files[file_type] = work / f"{model}-{file_type}.gguf"
        write_gguf(folder, files[file_type], file_type)
    return files


def enigma_runs(path: Path, rng: random.Random, batch: int) -> dict[str, float]:
    from enigma import LLM, SamplingParams

    llm = LLM(str(path), enable_prefix_caching=False)
    prompt = [rng.randrange(3, IDS) for _ in range(PROMPT)]
    one = SamplingParams(max_tokens=1, temperature=0)
    full = SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0, ignore_eos=True)
    llm.generate([prompt], one)  # warm-up
    start = time.perf_counter()
    llm.generate([prompt], one)
    first = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate([prompt], full)
    total = time.perf_counter() - start
    long_prompt = [rng.randrange(3, IDS) for _ in range(512)]
    start = time.perf_counter()
    llm.generate([long_prompt], one)
    prefill = time.perf_counter() - start
    prompts = [[rng.randrange(3, IDS) for _ in range(PROMPT)] for _ in range(batch)]
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=64, min_tokens=64, temperature=0, ignore_eos=True))
    batched = time.perf_counter() - start
    return {"decode": (NEW - 1) / (total - first), "prefill": prefill, "batch": batch * 64 / batched}


def llama_cpp_runs(llama_cpp, path: Path, rng: random.Random, threads: int) -> dict[str, float]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False, seed=0)

    def decode() -> float:
        prompt = [rng.randrange(3, IDS) for _ in range(PROMPT)]
        first = 0.0
        for n, _ in enumerate(llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True), 1):
            if n == 1:
                first = time.perf_counter()
            if n == NEW:
                break
        return (NEW - 1) / (time.perf_counter() - first)

    decode()  # warm-up
    rate = decode()
    llm.reset()
    tokens = [rng.randrange(3, IDS) for _ in range(512)]
    start = time.perf_counter()
    llm.eval(tokens)
    prefill = time.perf_counter() - start
    llm.close()
    return {"decode": rate, "prefill": prefill, "batch": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--models", default="125m,15m")
    parser.add_argument("--types", default="F32,Q8_0,Q4_K_M")
    args = parser.parse_args()
    os.environ.setdefault("ENIGMA_HOME", tempfile.mkdtemp(prefix="enigma-bench-home-"))
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "tests" / "plugins" / "ggml"))
    from conftest import CACHE, llama_cpp_site

    try:
        import llama_cpp
    except ImportError:
        sys.path.insert(0, str(llama_cpp_site(CACHE)))
        import llama_cpp
    work = Path(tempfile.mkdtemp(prefix="enigma-llamacpp-bench-"))
    types = args.types.split(",")
    files = {(model, t): path for model in args.models.split(",") for t, path in make_files(work, model, types).items()}
    results: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    rng = random.Random(0)
    for _ in range(args.rounds):
        for (model, file_type), path in files.items():
            results.setdefault((model, file_type, "enigma"), []).append(enigma_runs(path, rng, args.batch))
            results.setdefault((model, file_type, "llama.cpp"), []).append(
                llama_cpp_runs(llama_cpp, path, rng, args.threads))
    print(f"threads {args.threads}, {args.rounds} interleaved rounds, medians; llama.cpp "
          f"{llama_cpp.__version__} ({llama_cpp.llama_print_system_info().decode()[:60]}...)\n")
    print(f"| model | file | decode tok/s, enigma | llama.cpp | ratio | prefill 512 s, enigma | llama.cpp | ratio "
          f"| batch-{args.batch} tok/s, enigma | llama.cpp (one sequence) | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (model, file_type), path in files.items():
        ours, theirs = ({k: statistics.median(r[k] for r in results[(model, file_type, engine)])
                         for k in ("decode", "prefill", "batch")} for engine in ("enigma", "llama.cpp"))
        print(f"| {model} | {file_type} ({path.stat().st_size / 2**20:.0f} MiB) | {ours['decode']:.1f} | "
              f"{theirs['decode']:.1f} | {ours['decode'] / theirs['decode']:.2f}× | {ours['prefill']:.3f} | "
              f"{theirs['prefill']:.3f} | {theirs['prefill'] / ours['prefill']:.2f}× | {ours['batch']:.1f} | "
              f"{theirs['batch']:.1f} | {ours['batch'] / theirs['batch']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
