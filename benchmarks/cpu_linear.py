"""CPU matmuls by rows: enigma's native kernel vs oneDNN vs ``F.linear``.

Every Linear of the 110M benchmark Llama (12 layers of fused q/k/v 2304x768,
o 768x768, fused gate/up 4096x768, down 768x2048, then the 32000x768 head),
run once each for a batch of ``rows`` tokens, as a decode step does. The
weights (440 MB) stream from memory, as in any model larger than the CPU's
caches. Prints the time for all of them, median of interleaved repeats, and
the ratios against the native kernel.

    python benchmarks/cpu_linear.py [--threads 2] [--rows 1,2,4,8,16,32,48,64] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import BENCH_LLAMA


def model_weights() -> list[torch.Tensor]:
    hidden, inner = BENCH_LLAMA["hidden_size"], BENCH_LLAMA["intermediate_size"]
    layer = [(3 * hidden, hidden), (hidden, hidden), (2 * inner, hidden), (hidden, inner)]
    shapes = layer * BENCH_LLAMA["num_hidden_layers"] + [(BENCH_LLAMA["vocab_size"], hidden)]
    return [torch.randn(shape) * 0.02 for shape in shapes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,2,4,8,16,32,48,64")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from enigma.native import kernels

    native = kernels()
    if native is None:
        raise SystemExit("enigma's native kernels are unavailable here (see the warning above)")
    weights = model_weights()
    contenders = {
        "enigma native": native.linear,
        "oneDNN": lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
        "F.linear": F.linear,
    }
    print(f"all Linears of the 110M Llama ({sum(w.numel() for w in weights) * 4 / 1e6:.0f} MB fp32), "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"{'rows':>5} " + "".join(f"{name:>16}" for name in contenders) + "   oneDNN/native  F.linear/native")
    for rows in (int(r) for r in args.rows.split(",")):
        inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
        times: dict[str, list[float]] = {name: [] for name in contenders}
        with torch.inference_mode():
            for repeat in range(args.repeats + 1):
                for name, linear in contenders.items():
                    start = time.perf_counter()
                    for weight in weights:
                        linear(inputs[weight.shape[1]], weight)
                    if repeat:  # the first round warms up
                        times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        mine = medians["enigma native"]
        print(f"{rows:>5} " + "".join(f"{medians[name]:13.1f} ms" for name in contenders)
              + f"   {medians['oneDNN'] / mine:12.2f}x {medians['F.linear'] / mine:15.2f}x")


if __name__ == "__main__":
    main()
