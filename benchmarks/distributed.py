"""Training and serving past one process (enigma-plugin-zero), against one process, in the same run.

    python benchmarks/distributed.py        # --steps 30 --tokens 64

- Training: a 4-layer Llama (hidden 256, GQA; ~3.4M parameters) pre-trained for ``--steps`` steps
  of 8 sequences × 128 tokens, as one process (``--grad-accum 2``) and as two ZeRO-2 and ZeRO-1
  ranks (``--nproc 2 --grad-accum 1``: the same global batch). Reports tokens/s (whole run,
  including start-up, and the trainer's own steady-state figure), each rank's peak resident
  memory and the optimizer state it holds.
- Tensor-parallel inference: the same model (random weights) decoding ``--tokens`` tokens at
  batch 1 and batch 8, ``tensor_parallel_size`` 1 and 2; the per-step cost of the collectives
  measured on their own (gloo all-reduce of one decode step's hidden state, two per layer plus
  the embedding, and the logits gather, between two processes).

On a 2-core machine two ranks share the two cores: expect no speed-up; the point is the memory
per rank and what the collectives cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 384, "hidden_size": 256,
          "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
          "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "eos_token_id": 2}


def train_runs(work: Path, steps: int) -> list[dict]:
    from tiny_models import CORPUS, write_tokenizer

    write_tokenizer(work / "tok", template="chatml")
    (work / "config.json").write_text(json.dumps(CONFIG))
    (work / "corpus.txt").write_text(CORPUS * 200)
    enigma = Path(sys.executable).with_name("enigma")
    common = ["--data", str(work / "corpus.txt"), "--model", str(work / "config.json"), "--tokenizer",
              str(work / "tok"), "--seq-len", "128", "--batch-size", "4", "--max-steps", str(steps),
              "--eval-interval", str(steps), "--save-interval", str(10 * steps)]
    results = []
    for label, extra in (("1 process", ["--grad-accum", "2"]),
                         ("2 ranks, ZeRO-2", ["--nproc", "2", "--zero", "2"]),
                         ("2 ranks, ZeRO-1", ["--nproc", "2", "--zero", "1"])):
        out = work / label.replace(" ", "").replace(",", "-")
        started = time.perf_counter()
        done = subprocess.run([str(enigma), "train", *common, "--out", str(out), *extra], capture_output=True,
                              text=True)
        wall = time.perf_counter() - started
        if done.returncode:
            raise SystemExit(f"{label} failed:\n{done.stderr[-3000:]}")
        record = json.loads((out / "enigma_training.json").read_text())
        steady = [float(line.split("tok/s")[0].split()[-1].replace(",", ""))
                  for line in done.stderr.splitlines() if "tok/s" in line]
        results.append({"label": label, "tokens_per_s": record["tokens"] / wall,
                        "steady_tokens_per_s": statistics.median(steady[1:] or steady),
                        "peak_mib": [b / 2**20 for b in record["peak_rss_bytes_per_rank"]],
                        "optimizer_mib": [b / 2**20 for b in record["optimizer_state_bytes_per_rank"]]})
    return results


def decode_runs(work: Path, tokens: int, rounds: int) -> list[dict]:
    import torch
    import transformers
    from tiny_models import write_tokenizer

    from enigma import LLM, SamplingParams

    folder = work / "random-llama"
    write_tokenizer(folder, template="chatml")
    config = transformers.LlamaConfig(**{k: v for k, v in CONFIG.items() if k not in ("architectures",)})
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    results = []
    for size in (1, 2):
        with LLM(folder, tensor_parallel_size=size) as llm:
            for batch in (1, 8):
                prompts = [[1, 30 + i, 31, 32] for i in range(batch)]
                llm.generate(prompts, params)  # warm-up
                times = []
                for _ in range(rounds):
                    started = time.perf_counter()
                    llm.generate(prompts, params)
                    times.append(time.perf_counter() - started)
                step = statistics.median(times) / tokens
                results.append({"size": size, "batch": batch, "step_ms": step * 1e3,
                                "tokens_per_s": batch / step})
    return results


def collective_cost(rounds: int) -> dict:
    """Median µs of one decode step's collectives between two gloo processes: 2·layers + 1 all-reduces of
    [1, hidden] float32 and a gather of [1, vocab/2] logits."""
    script = f"""
import os, statistics, sys, time, datetime, torch, torch.distributed as dist
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2)
hidden = torch.zeros(1, {CONFIG["hidden_size"]}); logits = torch.zeros(1, {CONFIG["vocab_size"] // 2})
parts = [torch.empty_like(logits) for _ in range(2)] if rank == 0 else None
times = []
for round in range({rounds} * 50):
    started = time.perf_counter()
    for _ in range({2 * CONFIG["num_hidden_layers"] + 1}):
        dist.all_reduce(hidden)
    dist.gather(logits, parts, dst=0)
    times.append(time.perf_counter() - started)
if rank == 0:
    print(statistics.median(times[50:]) * 1e6)
dist.destroy_process_group()
"""
    from enigma_zero.launch import free_port

    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    peer = subprocess.Popen([sys.executable, "-c", script, "1", port], env=env)
    main = subprocess.run([sys.executable, "-c", script, "0", port], env=env, capture_output=True, text=True)
    peer.wait()
    return {"collectives": 2 * CONFIG["num_hidden_layers"] + 2, "step_us": float(main.stdout.strip())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        training = train_runs(work, args.steps)
        decoding = decode_runs(work, args.tokens, args.rounds)
    collectives = collective_cost(args.rounds)

    print(f"training, {args.steps} steps of 8 x 128 tokens (a {CONFIG['num_hidden_layers']}-layer Llama, "
          f"hidden {CONFIG['hidden_size']})")
    print(f"{'run':<18} {'tok/s (wall)':>13} {'tok/s (steps)':>14} {'peak RSS MiB/rank':>20} "
          f"{'optimizer MiB/rank':>20}")
    base = training[0]
    for run in training:
        print(f"{run['label']:<18} {run['tokens_per_s']:>13.0f} {run['steady_tokens_per_s']:>14.0f} "
              f"{' / '.join(f'{m:.0f}' for m in run['peak_mib']):>20} "
              f"{' / '.join(f'{m:.2f}' for m in run['optimizer_mib']):>20}  "
              f"({run['steady_tokens_per_s'] / base['steady_tokens_per_s']:.2f}x)")
    print(f"\ntensor-parallel decode, {args.tokens} tokens, median of {args.rounds}")
    print(f"{'size':>4} {'batch':>5} {'ms/step':>8} {'tok/s':>8}")
    for run in decoding:
        print(f"{run['size']:>4} {run['batch']:>5} {run['step_ms']:>8.2f} {run['tokens_per_s']:>8.0f}")
    print(f"\ncollectives of one TP=2 decode step ({collectives['collectives']}: "
          f"{2 * CONFIG['num_hidden_layers'] + 1} all-reduces + 1 gather, gloo, 2 processes): "
          f"{collectives['step_us']:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
