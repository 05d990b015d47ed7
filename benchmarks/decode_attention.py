"""Decode attention on CPU: enigma's native kernel vs the torch backend's torch paths.

One decode-only step's attention for every layer (each layer its own paged KV
cache, as in a model; fresh step metadata each time, as the engine makes it),
through ``TorchCPUBackend.attention`` with its native kernel (one pass over each
sequence's blocks through its block table) and without it (strided views
and SDPA per sequence, or a padded batch for short histories). Shapes are the
110M benchmark Llama's (12 layers, 12 heads of 64) and enigma-tiny's (6
layers, 8 query and 4 KV heads of 32). Prints milliseconds per step, median
of interleaved repeats, the KV bandwidth the native kernel reached, and the
ratio; the two paths' outputs must agree.

    python benchmarks/decode_attention.py [--threads 2] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import attrs
import torch

from enigma.attention import AttentionMetadata
from enigma.backends.torch_cpu import TorchCPUBackend

MODELS = {"110M": dict(layers=12, heads=12, kv_heads=12, dim=64), "enigma-tiny": dict(layers=6, heads=8, kv_heads=4,
                                                                                      dim=32)}
CASES = [("110M", 1, 128), ("110M", 1, 1000), ("110M", 16, 300), ("110M", 64, 300), ("enigma-tiny", 32, 150)]


def step_ms(backend: TorchCPUBackend, caches, query, key, value, metadata) -> float:
    step = attrs.evolve(metadata)  # a new object: per-step caches are rebuilt, as in a real step
    start = time.perf_counter()
    for cache in caches:
        backend.attention(query, key, value, kv_cache=cache, metadata=step, scale=0.125)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    backend = TorchCPUBackend(device="cpu")
    native = backend.native
    if native is None:
        raise SystemExit("enigma's native kernels are unavailable here (see the warning above)")
    print(f"decode attention, all layers of one step, median of {args.repeats}, {args.threads} threads")
    for model, sequences, length in CASES:
        shape = MODELS[model]
        block_size = 16
        metadata = AttentionMetadata.contiguous([1] * sequences, [length] * sequences, block_size=block_size)
        num_blocks = int(metadata.block_tables.max()) + 1
        caches = [torch.randn(backend.kv_cache_shape(num_blocks, block_size, shape["kv_heads"], shape["dim"]))
                  for _ in range(shape["layers"])]
        query = torch.randn(sequences, shape["heads"], shape["dim"])
        key, value = (torch.randn(sequences, shape["kv_heads"], shape["dim"]) for _ in range(2))
        outputs = {}
        for name in ("native", "torch"):
            backend.native = native if name == "native" else None
            outputs[name] = backend.attention(query, key, value, kv_cache=caches[0], metadata=metadata, scale=0.125)
        torch.testing.assert_close(outputs["native"], outputs["torch"], rtol=1e-4, atol=1e-5)
        times: dict[str, list[float]] = {"native": [], "torch": []}
        for _ in range(args.repeats):
            for name in times:
                backend.native = native if name == "native" else None
                times[name].append(step_ms(backend, caches, query, key, value, metadata))
        backend.native = native
        mine, theirs = statistics.median(times["native"]), statistics.median(times["torch"])
        kv_bytes = 2 * sequences * length * shape["kv_heads"] * shape["dim"] * 4 * shape["layers"]
        print(f"{model:>12} {sequences:>3} x {length:>4}: native {mine:7.2f} ms ({kv_bytes / mine / 1e6:5.1f} GB/s)"
              f"   torch {theirs:7.2f} ms   ratio {theirs / mine:.2f}x")


if __name__ == "__main__":
    main()
