"""EXL2 against llama.cpp's k-quants on the same model, in one run: perplexity at equal bits per weight,
quantization time, and CPU decode speed.

    python benchmarks/exl2.py [--models tiny,125m] [--rounds 3] [--threads 2]

- **Perplexity** (enigma-tiny, the only trained model here): held-out text — the Python docs' FAQ, prose
  made by enigma-tiny's corpus builder; calibration is the plugin's default (the tutorial), so none of the
  scored text was seen. Float, GGUF Q4_K_M / Q5_K_M / Q6_K (enigma-plugin-ggml, llama.cpp's bytes), and EXL2
  at 3.0, 4.0, 5.0, 6.0 bpw and at each k-quant's own bits per weight (one measurement, reused). Bits per
  weight are of the decoder layers' Linears, counted from the files (EXL2 keeps the embeddings in float16
  and its head at 6 bits; the k-quants keep the tied embedding in Q6_K). enigma-tiny's FFN width, 688,
  is no multiple of 256, so llama.cpp's recipe writes its ffn_down in a fallback type and the k-quants'
  bits per weight run high; EXL2 is quantized at the same figure (at most 8.0).
- **Quantization time**: EXL2 at 4.0 bpw (measurement + quantization) and GGUF Q4_K_M, same model.
- **Decode**: batch-1 greedy decode tok/s of EXL2 4.0 bpw and Q4_K_M, rounds interleaved, medians; on
  enigma-tiny and on the ~125M random Llama of benchmarks/llamacpp.py (its EXL2 measured on random
  calibration tokens: speed only, cached in ~/.cache/enigma-bench).

The Python docs come from Debian's python3.11-doc (apt-get download; cached as the RAG tests cache it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "enigma-bench"
SHAPE_125M = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4,
              "intermediate_size": 2048, "tie_word_embeddings": False}


def held_out_text() -> str:
    sys.path.insert(0, str(ROOT / "tests" / "plugins" / "rag"))
    sys.path.insert(0, str(ROOT / "tools" / "enigma_tiny"))
    from corpus import paragraphs
    from python_docs import docs_sources

    files = sorted((docs_sources() / "faq").glob("*.rst.txt"))
    return "\n\n".join(p for path in files for p in paragraphs(path.read_text(encoding="utf-8")))


def gguf_decoder_bpw(path: Path) -> float:
    import gguf

    bits = numel = 0
    for tensor in gguf.GGUFReader(str(path)).tensors:
        if tensor.name.startswith("blk.") and tensor.name.endswith(".weight") and len(tensor.shape) == 2:
            bits += int(tensor.n_bytes) * 8
            numel += int(tensor.n_elements)
    return bits / numel


def exl2_bpw(folder: Path) -> float:
    return json.loads((folder / "config.json").read_text())["quantization_config"]["achieved_bpw"]


def ppl(folder: Path, text: str) -> float:
    from enigma import LLM
    from enigma.evaluation.perplexity import perplexity

    return perplexity(LLM(str(folder)), [text]).perplexity


def decode_rate(folder: Path, rng: random.Random, vocab: int) -> float:
    from enigma import LLM, SamplingParams

    llm = LLM(str(folder), enable_prefix_caching=False)
    prompt = [rng.randrange(3, vocab) for _ in range(32)]
    one = SamplingParams(max_tokens=1, temperature=0)
    full = SamplingParams(max_tokens=128, min_tokens=128, temperature=0, ignore_eos=True)
    llm.generate([prompt], one)
    start = time.perf_counter()
    llm.generate([prompt], one)
    first = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate([prompt], full)
    return 127 / (time.perf_counter() - start - first)


def quality(work: Path, tiny: Path) -> dict[str, Path]:
    from enigma_ggml import write_gguf

    from enigma.llm import resolve_model_path
    from enigma.quantize import quantize

    text = held_out_text()
    rows = [("float32", 32.0, ppl(tiny, text))]
    made: dict[str, Path] = {}
    kquant_bpw = {}
    for file_type in ("Q4_K_M", "Q5_K_M", "Q6_K"):
        path = work / f"tiny-{file_type}.gguf"
        start = time.perf_counter()
        write_gguf(tiny, path, file_type)
        seconds = time.perf_counter() - start
        if file_type == "Q4_K_M":
            print(f"quantization time, enigma-tiny: GGUF Q4_K_M {seconds:.1f} s", flush=True)
        made[file_type] = resolve_model_path(path)
        kquant_bpw[file_type] = gguf_decoder_bpw(path)
        rows.append((f"GGUF {file_type}", kquant_bpw[file_type], ppl(made[file_type], text)))
        print(f"GGUF {file_type}: {kquant_bpw[file_type]:.3f} bpw over the decoder's Linears", flush=True)
    start = time.perf_counter()
    first = quantize(tiny, "EXL2", output=work / "tiny-exl2-4.0", options={"bpw": 4.0, "work_dir": str(work / "m")})
    print(f"quantization time, enigma-tiny: EXL2 4.0 bpw {time.perf_counter() - start:.1f} s "
          "(measurement of 32 x 512 calibration tokens, then GPTQ)", flush=True)
    made["EXL2"] = first
    measurement = str(first / "measurement.json")
    at_kquant = {t: min(round(b, 3), 8.0) for t, b in kquant_bpw.items()}   # EXL2 goes up to 8.0
    folders = {4.0: first}
    for target in sorted({3.0, 5.0, 6.0, *at_kquant.values()} - {4.0}):
        start = time.perf_counter()
        folders[target] = quantize(tiny, "EXL2", output=work / f"tiny-exl2-{target}",
                                   options={"bpw": target, "measurement": measurement})
        if target == 3.0:
            print(f"quantization time, reusing the measurement: {time.perf_counter() - start:.1f} s", flush=True)
    for target, folder in sorted(folders.items()):
        rows.append((f"EXL2 {target}", exl2_bpw(folder), ppl(folder, text)))
    base = rows[0][2]
    print(f"\nperplexity of enigma-tiny on the Python docs' FAQ ({len(text)} characters, held out)")
    print(f"{'model':<14} {'bpw':>6} {'perplexity':>11} {'increase':>9}")
    for name, bpw, value in rows:
        print(f"{name:<14} {bpw:6.3f} {value:11.3f} {100 * (value / base - 1):8.2f}%")
    print("\nat equal bits per weight (EXL2 increase / k-quant increase; target <= 1):")
    for file_type, bpw in kquant_bpw.items():
        ours = next(v for n, b, v in rows if n == f"EXL2 {at_kquant[file_type]}")
        theirs = next(v for n, b, v in rows if n == f"GGUF {file_type}")
        ratio = (ours - base) / max(theirs - base, 1e-9)
        print(f"  {file_type} ({bpw:.3f} bpw; EXL2 at {at_kquant[file_type]}): EXL2 +{100 * (ours / base - 1):.2f}% vs "
              f"+{100 * (theirs / base - 1):.2f}%  ratio {ratio:.2f}")
    return made


def bench_125m(work: Path) -> dict[str, Path]:
    import torch
    from enigma_ggml import write_gguf

    from enigma.llm import resolve_model_path
    from enigma.quantize import quantize

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import make_bench_model

    folder = CACHE / "exl2-125m-float"
    if not (folder / "config.json").exists():
        make_bench_model(folder, **SHAPE_125M)
    exl2 = CACHE / "exl2-125m-4.0"
    if not (exl2 / "config.json").exists():
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 380, (8 * 256,), generator=generator).tolist()
        from enigma.tokenizer import Tokenizer

        text = Tokenizer(folder).decode(ids)
        start = time.perf_counter()
        quantize(folder, "EXL2", output=exl2, options={"bpw": 4.0, "calibration_texts": [text * 4],
                                                       "calibration_rows": 8, "calibration_length": 256})
        print(f"quantization time, 125M: EXL2 4.0 bpw {time.perf_counter() - start:.0f} s (8 x 256 calibration)")
    path = work / "125m-Q4_K_M.gguf"
    start = time.perf_counter()
    write_gguf(folder, path, "Q4_K_M")
    print(f"quantization time, 125M: GGUF Q4_K_M {time.perf_counter() - start:.1f} s", flush=True)
    return {"EXL2": exl2, "Q4_K_M": resolve_model_path(path)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,125m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("ENIGMA_HOME", tempfile.mkdtemp(prefix="enigma-bench-home-"))
    import torch

    from enigma.llm import resolve_model_path

    torch.set_num_threads(args.threads)
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="enigma-bench-exl2-"))
    try:
        models = {}
        if "tiny" in args.models.split(","):
            made = quality(work, resolve_model_path("enigma-tiny"))
            models["enigma-tiny"] = ({"EXL2": made["EXL2"], "Q4_K_M": made["Q4_K_M"]}, 4096)
        if "125m" in args.models.split(","):
            models["125M"] = (bench_125m(work), 380)
        rng = random.Random(0)
        for model, (folders, vocab) in models.items():
            rates: dict[str, list[float]] = {name: [] for name in folders}
            for _ in range(args.rounds):
                for name, folder in folders.items():
                    rates[name].append(decode_rate(folder, rng, vocab))
            exl2, q4 = statistics.median(rates["EXL2"]), statistics.median(rates["Q4_K_M"])
            print(f"decode {model}, batch 1, {args.threads} threads: EXL2 4.0 bpw {exl2:.1f} tok/s, "
                  f"Q4_K_M {q4:.1f} tok/s, ratio {exl2 / q4:.2f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
