"""Multiple-choice evaluation: enigma's evaluator vs lm-evaluation-harness's ``hf`` backend, same items.

The 110M benchmark Llama (fp32), ``--items`` HellaSwag-style questions of 4
choices (shared contexts of ~40 tokens, endings of ~10), zero-shot, on the
CPU threads given. Both compute acc and acc_norm; each choice's log-likelihood is compared (the
random model makes choices nearly equally likely, so float noise between
the two implementations can flip a near-tie in acc). Prints each side's time
and the ratio.

    python benchmarks/evaluate.py [--items 200] [--threads 2] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from common import make_bench_model
from lm_eval_tasks import write_multiple_choice_task

WORDS = ("list", "tuple", "dict", "set", "generator", "iterator", "module", "class", "function",
         "string", "bytes", "float", "integer", "decorator", "context", "manager", "coroutine")


def write_items(path: Path, count: int) -> None:
    lines = []
    for index in range(count):
        pick = [WORDS[(index * 7 + k) % len(WORDS)] for k in range(12)]
        context = (f"Question {index}: in Python, when you write a {pick[0]} inside a {pick[1]} and pass it to a "
                   f"{pick[2]} that returns a {pick[3]}, what do you get back from the call?")
        choices = [f"a {pick[4 + k]} of {pick[8 + k % 4]} values" for k in range(4)]
        lines.append(json.dumps({"query": context, "choices": choices, "label": index % 4}))
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval hf's batch size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    work = Path(tempfile.mkdtemp(prefix="enigma-eval-bench-"))
    os.environ["HF_HOME"] = str(work / "hf-home")
    folder = make_bench_model(work / "model")
    data = work / "items.jsonl"
    write_items(data, args.items)
    write_multiple_choice_task(work, "bench_mc", data, text_field="query")
    print(f"model: random Llama, 110M parameters, fp32; threads: {args.threads}; {args.items} questions x 4 choices")

    from enigma import LLM
    from enigma.evaluation import evaluate_multiple_choice, loglikelihoods, read_multiple_choice

    llm = LLM(folder)
    questions = read_multiple_choice(data, "mc")
    start = time.perf_counter()
    ours = evaluate_multiple_choice(llm, questions)
    enigma_s = time.perf_counter() - start
    our_lls = [ll for ll, _ in loglikelihoods(llm, [(q.context, " " + c) for q in questions for c in q.choices])]
    # (the same numbers evaluate_multiple_choice scored: both lead with BOS, as lm-eval's hf backend does)
    print(f"enigma eval: {enigma_s:.1f} s   acc {ours.acc:.4f} acc_norm {ours.acc_norm:.4f}", flush=True)

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    results = simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32,device=cpu",
                              tasks=["bench_mc"], task_manager=TaskManager(include_path=str(work)),
                              batch_size=args.batch_size, log_samples=True)
    lm_eval_s = time.perf_counter() - start
    theirs = results["results"]["bench_mc"]
    print(f"lm-eval hf (batch {args.batch_size}): {lm_eval_s:.1f} s   acc {theirs['acc,none']:.4f} "
          f"acc_norm {theirs['acc_norm,none']:.4f}")
    samples = sorted(results["samples"]["bench_mc"], key=lambda sample: sample["doc_id"])
    their_lls = [float(resp[0]) for sample in samples for resp in sample["filtered_resps"]]
    gap = max(abs(a - b) for a, b in zip(our_lls, their_lls))
    spread = sum(max(our_lls[i:i + 4]) - min(our_lls[i:i + 4]) for i in range(0, len(our_lls), 4)) / args.items
    print(f"max |loglikelihood difference| {gap:.2e} (mean spread between a question's choices {spread:.2e}); "
          f"enigma is {lm_eval_s / enigma_s:.2f}x faster")


if __name__ == "__main__":
    main()
