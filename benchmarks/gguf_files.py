"""GGUF files: perplexity in enigma and in llama.cpp on the same files, sizes, and quantization time.

1. Perplexity of enigma-tiny as F32, Q8_0, Q6_K, Q5_K_M and Q4_K_M GGUF files (written by enigma) on
   held-out Python-docs text: the C-API reference of the CPython 3.11 docs, a section enigma-tiny's
   corpus leaves out (``tools/enigma_tiny/corpus.py`` SECTIONS), as the corpus script cleans it.
   Windows of ``--window`` tokens, each scored from its second token on. enigma: ``LLM(file)`` with
   ``prompt_logprobs``; llama.cpp: llama-cpp-python 0.3.36 (``logits_all``) on the same file and ids.
2. File size and bits per weight of each type (enigma-tiny's, and the 125M model's below).
3. Quantization time of a 125M-parameter GQA Llama (random weights, the shape of
   ``../shared/anchors``' llama100m) to Q4_K_M from its F32 GGUF: llama.cpp's ``llama_model_quantize``
   (2 threads) vs enigma's requantization of the same file, and enigma from the HF folder; then the
   resident memory of ``LLM("...Q4_K_M.gguf")`` next to the file's size.

llama.cpp comes from the oracle cache the tests fill (``tests/plugins/ggml/conftest.py``; about 4 minutes
to build the first time). The docs come from Debian's python3.11-doc (fetched with apt-get download).

    python benchmarks/gguf_files.py [--window 256] [--windows 24]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TYPES = ("F32", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")


def held_out_text(work: Path) -> str:
    sys.path.insert(0, str(ROOT / "tools" / "enigma_tiny"))
    from build import find_docs
    from corpus import SECTIONS, paragraphs

    sources = find_docs(work, None)
    assert "c-api" not in SECTIONS
    files = sorted((sources / "c-api").rglob("*.rst.txt"))
    return "\n\n".join(p for path in files for p in paragraphs(path.read_text(encoding="utf-8")))


def enigma_nll(path: Path, windows: list[list[int]]) -> tuple[float, int]:
    from enigma import LLM, SamplingParams

    llm = LLM(str(path))
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    total, count = 0.0, 0
    for output in llm.generate([list(w) for w in windows], params):
        for token, entry in zip(output.prompt_token_ids[1:], output.prompt_logprobs[1:]):
            total -= entry[token].logprob
            count += 1
    return total, count


def llama_cpp_nll(llama_cpp, path: Path, windows: list[list[int]]) -> tuple[float, int]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(windows[0]), n_batch=len(windows[0]), logits_all=True,
                          n_threads=2, verbose=False)
    total, count = 0.0, 0
    for window in windows:
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window)], dtype=np.float64)
        top = logits.max(-1, keepdims=True)
        log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        total -= float(sum(log_probs[i - 1, window[i]] for i in range(1, len(window))))
        count += len(window) - 1
    return total, count


MEMORY_CHILD = r"""
import gc, sys
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
import torch, enigma_ggml
from enigma import LLM
gc.collect()
before = rss()
llm = LLM(sys.argv[1], num_kv_blocks=64)
gc.collect()
print(rss() - before, llm._runner.bytes_per_block * 64 / 2**20)
"""


def resident_memory(path: Path) -> None:
    """RSS growth of a fresh process when ``LLM(path)`` loads (64 KV blocks), next to the file's size."""
    import subprocess

    grown, kv = map(float, subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(path)], check=True,
                                          capture_output=True, text=True).stdout.split())
    size = path.stat().st_size / 2**20
    print(f"  LLM({path.name}): resident memory grows {grown:.1f} MiB = file {size:.1f} MiB + KV {kv:.1f} MiB "
          f"+ {grown - size - kv:.1f} MiB (tokenizer, engine)")


def quantization_times(llama_cpp, work: Path) -> dict[str, float]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import make_bench_model
    from enigma_ggml import write_gguf
    from enigma_ggml.requantize import requantize_gguf

    folder = make_bench_model(work / "llama125m", num_key_value_heads=4, tie_word_embeddings=False)
    f32 = work / "llama125m-f32.gguf"
    write_gguf(folder, f32, "F32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    times: dict[str, list[float]] = {"llama.cpp": [], "enigma (same F32 GGUF)": [], "enigma (HF folder)": []}
    for round_ in range(2):
        for name in times:
            target = work / f"q4-{round_}-{len(times[name])}-{name[:6]}.gguf"
            start = time.perf_counter()
            if name == "llama.cpp":
                assert llama_cpp.llama_model_quantize(str(f32).encode(), str(target).encode(), params) == 0
            elif "same" in name:
                requantize_gguf(f32, target, "Q4_K_M")
            else:
                write_gguf(folder, target, "Q4_K_M")
            times[name].append(time.perf_counter() - start)
            target.unlink()
    parameters = sum(int(np.prod(t.shape)) for t in __import__("gguf").GGUFReader(str(f32)).tensors)
    print(f"\n{parameters / 1e6:.0f}M parameters, F32 GGUF -> Q4_K_M (best of 2 rounds, interleaved):")
    best = {name: min(values) for name, values in times.items()}
    for name, seconds in best.items():
        print(f"  {name:<24} {seconds:6.2f} s  {seconds / best['llama.cpp']:.2f}x llama.cpp")
    print(f"\n{parameters / 1e6:.0f}M parameters, each file type written by enigma:")
    print("| type | file | bits/weight |\n|---|---|---|")
    from enigma_ggml.recipe import FILE_TYPES

    for file_type in FILE_TYPES:
        target = work / f"llama125m-{file_type}.gguf"
        write_gguf(folder, target, file_type)
        size = target.stat().st_size
        print(f"| {file_type} | {size / 2**20:.1f} MiB | {size * 8 / parameters:.2f} |", flush=True)
        if file_type == "Q4_K_M":
            kept = target
        else:
            target.unlink()
    print("\nMemory (weights stay in their blocks):")
    resident_memory(kept)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--windows", type=int, default=24)
    args = parser.parse_args()
    os.environ.setdefault("ENIGMA_HOME", tempfile.mkdtemp(prefix="enigma-bench-home-"))
    sys.path.insert(0, str(ROOT / "tests" / "plugins" / "ggml"))
    from conftest import CACHE, llama_cpp_site

    try:
        import llama_cpp
    except ImportError:
        sys.path.insert(0, str(llama_cpp_site(CACHE)))
        import llama_cpp
    from enigma_ggml import write_gguf

    from enigma.llm import resolve_model_path
    from enigma.tokenizer import Tokenizer

    work = Path(tempfile.mkdtemp(prefix="enigma-gguf-bench-"))
    tiny = resolve_model_path("enigma-tiny")
    ids = Tokenizer(tiny).encode(held_out_text(work), add_special_tokens=False)
    windows = [ids[i * args.window:(i + 1) * args.window] for i in range(args.windows)]
    assert len(windows[-1]) == args.window, f"the held-out text has only {len(ids)} tokens"
    parameters = sum(t.numel() for t in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        tiny / "model.safetensors").values())
    print(f"enigma-tiny ({parameters / 1e6:.2f}M parameters), {args.windows} windows of {args.window} tokens of the "
          f"C-API docs ({len(ids)} tokens available)\n")
    print("| type | file | bits/weight | perplexity, enigma | perplexity, llama.cpp | enigma / llama.cpp |")
    print("|---|---|---|---|---|---|")
    for file_type in TYPES:
        path = work / f"enigma-tiny-{file_type}.gguf"
        write_gguf(tiny, path, file_type)
        ours = math.exp(enigma_nll(path, windows)[0] / sum(len(w) - 1 for w in windows))
        total, count = llama_cpp_nll(llama_cpp, path, windows)
        theirs = math.exp(total / count)
        size = path.stat().st_size
        print(f"| {file_type} | {size / 2**20:.2f} MiB | {size * 8 / parameters:.2f} | {ours:.3f} | {theirs:.3f} | "
              f"{ours / theirs:.4f} |", flush=True)
    quantization_times(llama_cpp, work)


if __name__ == "__main__":
    main()
