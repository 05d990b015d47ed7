"""LoRA training: enigma-plugin-lora vs PEFT on a plain transformers loop — tokens/s and peak memory; QLoRA's.

    python benchmarks/lora.py            # --threads 2 --steps 10 --seq-len 256 --batch-size 8 --rank 16

The benchmark Llama of benchmarks/train.py (same initial weights), the same
batches, LoRA rank 16 on q/k/v/o and the MLP (``all-linear``), AdamW on the
adapters, each side in a fresh process that samples its own anonymous
resident memory (``RssAnon``) every 2 ms: the peak above what the process
held before building the model (both sides import enigma, its plugins,
transformers and peft first). ``enigma-qlora`` holds the frozen base in
NF4 with bf16 elsewhere (bf16 autocast). Prints tokens/s (after 2 warm-up
steps) and peak memory of each, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, sys.argv[5])
import torch
torch.set_num_threads(int(sys.argv[3]))
import train as bench
mode, work, _, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
bench.WORK = __import__("pathlib").Path(work)
batches = torch.load(bench.WORK / "batches.pt")
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
peak, done = 0, threading.Event()
def sample():
    global peak
    while not done.is_set():
        peak = max(peak, rss()); time.sleep(0.002)
import transformers, peft, enigma_lora
from enigma_lora import LoRAConfig, apply_lora
from enigma_lora.nf4 import quantize_linears
from enigma.plugins import get_host
get_host()  # plugin discovery and imports are not the model's memory: both sides pay them before the baseline
base = rss()
threading.Thread(target=sample, daemon=True).start()
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
if mode == "peft":
    model = transformers.AutoModelForCausalLM.from_pretrained(bench.WORK / "hf-init", dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    model.train()
    step = bench.transformers_step
else:
    from enigma.loader import load_model
    dtype = torch.bfloat16 if mode == "enigma-qlora" else torch.float32
    model = load_model(bench.WORK / "hf-init", dtype=dtype).model.train()
    if mode == "enigma-qlora":
        for p in model.parameters():
            p.requires_grad_(False)
        quantize_linears(model)
    apply_lora(model, LoRAConfig(rank=rank, alpha=2 * rank, target_modules=targets))
    step = bench.enigma_step
params = [p for p in model.parameters() if p.requires_grad]
frozen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
          for t in [*model.parameters(), *model.buffers()] if not t.requires_grad}
base_bytes = sum(frozen.values())
optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
import contextlib
autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "enigma-qlora" else contextlib.nullcontext()
with autocast:
    for batch in batches[:2]:
        first = step(model, optimizer, batch)
    start = time.perf_counter()
    for batch in batches[2:]:
        step(model, optimizer, batch)
    elapsed = time.perf_counter() - start
done.set()
tokens = sum(b[0].shape[0] * (b[0].shape[1] - 1) for b in batches[2:])
print(json.dumps({"tokens_per_s": tokens / elapsed, "peak": max(peak, rss()) - base, "first_loss": first,
                  "trainable": sum(p.numel() for p in params), "base_bytes": base_bytes}))
"""


def run(mode: str, work: Path, threads: int, rank: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(work), str(threads), str(rank), str(HERE)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import train as bench

    work = Path(tempfile.mkdtemp(prefix="enigma-lora-bench-"))
    bench.WORK = work
    batches = bench.make_inputs(work, args.seq_len, args.batch_size, args.steps)
    torch.save(batches, work / "batches.pt")
    model = bench.enigma_model()
    bench.transformers_model(model)  # writes hf-init: the weights both sides start from
    size = sum(p.numel() for p in dict.fromkeys(model.parameters())) * 4
    del model
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for mode in ("enigma", "peft", "enigma-qlora"):
            result = run(mode, work, args.threads, args.rank)
            if mode not in best or result["tokens_per_s"] > best[mode]["tokens_per_s"]:
                best[mode] = result
    print(f"model {size / 2**20:.0f} MiB fp32; batch {args.batch_size} x {args.seq_len}; LoRA rank {args.rank} on "
          f"all linear layers; {args.threads} threads; {args.steps - 2} timed steps, best of {args.repeats}")
    for mode, result in best.items():
        print(f"{mode:13s} {result['tokens_per_s']:8.0f} tok/s   peak RssAnon {result['peak'] / 2**20:6.0f} MiB   "
              f"frozen base {result['base_bytes'] / 2**20:5.0f} MiB   trainable {result['trainable']:,}   "
              f"first loss {result['first_loss']:.5f}")
    ours, theirs, q = best["enigma"], best["peft"], best["enigma-qlora"]
    print(f"enigma / peft: speed {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x, memory "
          f"{ours['peak'] / theirs['peak']:.2f}x; QLoRA: peak {q['peak'] / ours['peak']:.2f}x LoRA's, frozen base "
          f"{q['base_bytes'] / ours['base_bytes']:.2f}x its fp32 size")


if __name__ == "__main__":
    main()
