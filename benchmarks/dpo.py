"""DPO: enigma-plugin-dpo's step vs TRL 1.16's DPOTrainer step on the same model and batch — steps/s.

The 27M-parameter Llama of benchmarks/train.py, ``--pairs`` preference pairs
(prompts of ~60 tokens, completions of ~40), batch ``--batch-size`` pairs,
full fine-tuning in fp32 with AdamW, the reference log-probabilities computed
beforehand on both sides (TRL's ``precompute_ref_log_probs``; enigma always
does). Times ``--steps`` optimizer steps after one warm-up, best of
``--repeats``; prints both and the ratio, and each side's first loss.

    python benchmarks/dpo.py [--threads 2] [--steps 6] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def records(count: int) -> list[dict]:
    words = ["list", "tuple", "dict", "set", "generator", "iterator", "module", "class", "function", "decorator",
             "context", "manager"]
    rows = []
    for i in range(count):
        pick = [words[(i * 5 + k) % len(words)] for k in range(12)]
        prompt = f"Question {i}: " + " ".join(pick * 3) + " — which is mutable?"
        rows.append({"prompt": prompt, "chosen": " " + " ".join(pick[:6] * 3), "rejected": " " + " ".join(
            reversed(pick[:6] * 3))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import train as bench
    import transformers
    import trl
    from datasets import Dataset

    from enigma.loader import load_model
    from enigma.tokenizer import Tokenizer
    from enigma_dpo.data import collate, tokenize_pair
    from enigma_dpo.loss import dpo_loss
    from enigma_dpo.trainer import DPOTrainer, sequence_logps

    work = Path(tempfile.mkdtemp(prefix="enigma-dpo-bench-"))
    bench.WORK = work
    bench.make_inputs(work, 64, 1, 1)
    bench.transformers_model(bench.enigma_model())
    folder = work / "hf-init"
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(work / "tok" / name, folder / name)
    rows = records(args.pairs)

    tokenizer = Tokenizer(folder)
    pairs = [tokenize_pair(r, tokenizer, where="") for r in rows]
    lengths = [len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs]

    def enigma_steps() -> tuple[float, float]:
        model = load_model(folder, dtype=torch.float32).model.train()
        DPOTrainer.score_reference(model, pairs, 0, batch_size=args.batch_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
        batches = [collate(pairs[i:i + args.batch_size], 0) for i in range(0, len(pairs), args.batch_size)]

        def step(batch) -> float:
            logps = sequence_logps(model, batch)
            n = logps.shape[0] // 2
            loss, _ = dpo_loss(logps[:n], logps[n:], batch["ref_logps"][:n], batch["ref_logps"][n:], beta=0.1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        first = step(batches[0])
        start = time.perf_counter()
        for index in range(args.steps):
            step(batches[(index + 1) % len(batches)])
        return args.steps / (time.perf_counter() - start), first

    def trl_steps() -> tuple[float, float]:
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        if hf_tokenizer.eos_token is None:
            hf_tokenizer.eos_token = hf_tokenizer.convert_ids_to_tokens(0)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
        config = trl.DPOConfig(output_dir=str(work / "trl"), beta=0.1, report_to="none", use_cpu=True, bf16=False,
                               per_device_train_batch_size=args.batch_size, learning_rate=1e-5,
                               precompute_ref_log_probs=True, max_length=512, dataloader_num_workers=0)
        trainer = trl.DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                                 processing_class=hf_tokenizer)
        trainer.create_optimizer_and_scheduler(num_training_steps=args.steps + 1)
        trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets before its steps
        loader = trainer.get_train_dataloader()
        batches = [b for _, b in zip(range(args.steps + 1), iter(loader))]
        model.train()

        def step(batch) -> float:
            loss = trainer.training_step(model, batch)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            return float(loss)

        first = step(batches[0])
        start = time.perf_counter()
        for batch in batches[1:]:
            step(batch)
        return args.steps / (time.perf_counter() - start), first

    best = {"enigma": (0.0, 0.0), "trl": (0.0, 0.0)}
    for _ in range(args.repeats):
        for name, fn in (("enigma", enigma_steps), ("trl", trl_steps)):
            result = fn()
            if result[0] > best[name][0]:
                best[name] = result
    print(f"{args.pairs} pairs, ~{sum(lengths) / len(lengths):.0f} tokens each side, batch {args.batch_size} pairs; "
          f"{args.threads} threads; {args.steps} timed steps, best of {args.repeats}")
    for name, (speed, first) in best.items():
        print(f"{name:7s} {speed:6.2f} steps/s   first loss {first:.5f}")
    print(f"enigma / trl: {best['enigma'][0] / best['trl'][0]:.2f}x")


if __name__ == "__main__":
    main()
