"""K-quant quantization speed: enigma-plugin-ggml's quantizers vs libggml's ``ggml_quantize_chunk``, same rows.

Quantizes a ``--rows`` x ``--cols`` float32 matrix (N(0, 0.02), like weights)
to Q4_K, Q5_K, Q6_K and Q8_0 with each, checks the bytes are equal, and
prints the time of each and the ratio. libggml is the oracle the tests build
from llama-cpp-python 0.3.36's sdist (cached in ~/.cache/enigma-test-oracles).
libggml's call is single-threaded (llama.cpp's quantizer spreads rows over
its own threads); enigma's uses ``--threads`` OpenMP threads, so the
single-thread line is the like-for-like one.

    python benchmarks/kquants.py [--rows 4096] [--cols 4096] [--threads 2]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GGML_TYPE = {"Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}

CHILD = r"""
import os, sys, time, numpy as np
from enigma_ggml import quantize
rows = np.load(sys.argv[1])
quantize(rows[:8], sys.argv[2])  # compile and load the library first
start = time.perf_counter()
out = quantize(rows, sys.argv[2])
print(time.perf_counter() - start)
np.save(sys.argv[3], out)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests" / "plugins" / "ggml"))
    from conftest import CACHE, build_libggml

    library = ctypes.CDLL(str(build_libggml(CACHE)))
    library.ggml_quantize_chunk.restype = ctypes.c_size_t
    library.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    from enigma_ggml.quants import row_bytes

    work = Path(os.environ.get("TMPDIR", "/tmp")) / "enigma-kquants-bench"
    work.mkdir(exist_ok=True)
    rows = (np.random.default_rng(0).standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    np.save(work / "rows.npy", rows)
    print(f"{args.rows} x {args.cols} float32 ({rows.nbytes / 2**20:.0f} MiB)")
    for name, ggml_type in GGML_TYPE.items():
        expected = np.zeros((args.rows, row_bytes(name, args.cols)), dtype=np.uint8)
        start = time.perf_counter()
        library.ggml_quantize_chunk(ggml_type, rows.ctypes.data, expected.ctypes.data, 0, args.rows, args.cols, None)
        theirs = time.perf_counter() - start
        timings = {}
        for threads in sorted({1, args.threads}):
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            done = subprocess.run([sys.executable, "-c", CHILD, str(work / "rows.npy"), name, str(work / "out.npy")],
                                  env=env, capture_output=True, text=True, check=True)
            timings[threads] = float(done.stdout.strip().splitlines()[-1])
            same = np.array_equal(np.load(work / "out.npy"), expected)
        line = "  ".join(f"enigma {t} thread{'s' if t > 1 else ''} {v:6.2f} s ({theirs / v:.2f}x)"
                         for t, v in timings.items())
        print(f"{name:5s} libggml 1 thread {theirs:6.2f} s   {line}   bytes equal: {same}")


if __name__ == "__main__":
    main()
