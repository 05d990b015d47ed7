"""Speculative decoding's speed-up on enigma-tiny: each draft source against plain decoding, same run.

    python benchmarks/speculative.py        # --rounds 5 --max-tokens 128

Batch 1 (one request at a time, greedy unless said), tokens per second, median of interleaved rounds:

- ``extractive``: prompts that already hold the answer, as in editing, extraction and RAG answers that
  quote their sources. enigma-tiny (5M parameters) does not follow "repeat the text above", so each
  prompt is a documentation passage's opening, what enigma-tiny writes after it, and the opening again:
  what it writes next copies from its prompt. Prompt lookup (``[ngram]``, adaptive k up to 8, and 16).
- ``ordinary``: documentation-style openings and questions (none of them in the draft's
  distillation data); the trained draft ``enigma-tiny-draft`` (adaptive k up to 8), the self-draft (``[self]``, the
  first 2 of 6 layers) and prompt lookup; also sampled at enigma-tiny's defaults (temperature 0.6, top-p 0.9).
- ``low acceptance``: a draft with enigma-tiny's tokenizer and random weights, almost never right:
  adaptive k must keep speculation from costing more than a few percent.
- batch 16: the ordinary prompts all at once, with and without the draft model and prompt lookup.

Prints tok/s, the ratio to plain decoding and the draft acceptance rate of each.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

PASSAGES = [
    "The json module exposes an API familiar to users of the standard library marshal and pickle modules. "
    "Encoding basic Python object hierarchies is done with dumps, which returns a string.",
    "A list comprehension consists of brackets containing an expression followed by a for clause, then zero "
    "or more for or if clauses. The result will be a new list resulting from evaluating the expression.",
    "The with statement is used to wrap the execution of a block with methods defined by a context manager. "
    "This allows common try, except and finally usage patterns to be encapsulated for convenient reuse.",
    "Threads are run concurrently but only one of them executes Python bytecode at a time. The global "
    "interpreter lock makes the object model safe against concurrent access.",
]
OPENINGS = [
    "The os.path module implements some useful functions on pathnames. To read or write files see",
    "An iterator is an object representing a stream of data. Repeated calls to the iterator's",
    "The socket module provides access to the BSD socket interface. It is available on all modern",
    "Decorators are functions that take another function and extend its behaviour without",
    "The logging module defines functions and classes which implement a flexible event logging",
    "A dictionary maps hashable values to arbitrary objects. Dictionaries are mutable objects.",
]
QUESTIONS = ["What does itertools.chain do?", "What is a generator?", "What does str.split do?",
             "What is the global interpreter lock?", "What does functools.partial do?",
             "What is a virtual environment?"]


def extractive_prompts(llm, params) -> list[str]:
    """Prompts that hold their answers: opening, enigma-tiny's continuation of it, the opening again."""
    openings = [passage[:64] for passage in PASSAGES]
    continuations = [output.outputs[0].text for output in llm.generate(openings, params)]
    return [f"{opening}{continuation}\n\n{opening}" for opening, continuation in zip(openings, continuations)]


def random_draft(folder: Path) -> Path:
    """enigma-tiny's tokenizer and shape of the trained draft, random weights: a draft that is almost never right."""
    import json
    import shutil

    import enigma_tiny
    import torch

    from enigma.models.llama import LlamaForCausalLM
    from enigma.saving import save_model_folder
    from enigma.training.sft import init_weights

    config = json.loads((enigma_tiny.draft_path() / "config.json").read_text())
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_hf_config(config)
    init_weights(model, std=0.02)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(enigma_tiny.model_path() / name, folder / name)
    return save_model_folder(model, config, folder, tokenizer_folder=folder)


def run(llm, prompts, params, *, batch: bool) -> tuple[float, int]:
    """Seconds and generated tokens for ``prompts``: one at a time, or all together (``batch``)."""
    started = time.perf_counter()
    outputs = llm.generate(prompts, params) if batch else [llm.generate([prompt], params)[0] for prompt in prompts]
    seconds = time.perf_counter() - started
    return seconds, sum(len(o.outputs[0].token_ids) for o in outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from enigma import LLM, SamplingParams
    from enigma.chat_template import render_chat
    from enigma.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    import enigma_tiny

    template = Tokenizer(enigma_tiny.model_path())
    chats = [render_chat(template.chat_template, [{"role": "user", "content": q}], add_generation_prompt=True)
             for q in QUESTIONS]
    ordinary = OPENINGS + chats
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    sampled = SamplingParams(temperature=0.6, top_p=0.9, max_tokens=args.max_tokens, ignore_eos=True, seed=0)
    scratch = Path(tempfile.mkdtemp(prefix="enigma-spec-bench-"))
    bad_draft = random_draft(scratch / "random-draft")

    engines = {
        "plain": LLM("enigma-tiny"),
        "[ngram] k=8": LLM("enigma-tiny", speculative_model="[ngram]", num_speculative_tokens=8),
        "[ngram] k=16": LLM("enigma-tiny", speculative_model="[ngram]", num_speculative_tokens=16),
        "draft k<=8": LLM("enigma-tiny", speculative_model="enigma-tiny-draft", num_speculative_tokens=8),
        "[self] 2 layers k=4": LLM("enigma-tiny", speculative_config={"method": "self", "draft_layers": 2}),
        "random draft k<=8": LLM("enigma-tiny", speculative_model=str(bad_draft), num_speculative_tokens=8),
    }
    cases = [  # (workload, prompts, params, batch, engines)
        ("extractive, greedy, batch 1", extractive_prompts(engines["plain"], greedy), greedy, False,
         ["plain", "[ngram] k=8", "[ngram] k=16"]),
        ("ordinary, greedy, batch 1", ordinary, greedy, False,
         ["plain", "draft k<=8", "[self] 2 layers k=4", "[ngram] k=8"]),
        ("ordinary, sampled, batch 1", ordinary, sampled, False, ["plain", "draft k<=8"]),
        ("low acceptance, greedy, batch 1", ordinary, greedy, False, ["plain", "random draft k<=8"]),
        ("ordinary, greedy, batch 16", (ordinary * 2)[:16], greedy, True, ["plain", "draft k<=8", "[ngram] k=8"]),
    ]
    for _, prompts, params, batch, names in cases:  # warm every engine on its workload once
        for name in names:
            run(engines[name], prompts[:2], params, batch=batch)
    print(f"enigma-tiny, {args.threads} threads, {args.max_tokens} tokens an answer, median of {args.rounds} "
          "interleaved rounds")
    for workload, prompts, params, batch, names in cases:
        rates: dict[str, list[float]] = {name: [] for name in names}
        before = {name: dict(engines[name].engine.stats()) for name in names}
        for _ in range(args.rounds):
            for name in names:
                seconds, tokens = run(engines[name], prompts, params, batch=batch)
                rates[name].append(tokens / seconds)
        base = statistics.median(rates["plain"])
        print(f"\n{workload}")
        for name in names:
            rate = statistics.median(rates[name])
            stats = engines[name].engine.stats()
            drafted = stats.get("spec_decode_num_draft_tokens", 0) - before[name].get("spec_decode_num_draft_tokens", 0)
            accepted = (stats.get("spec_decode_num_accepted_tokens", 0)
                        - before[name].get("spec_decode_num_accepted_tokens", 0))
            acceptance = f"acceptance {accepted / drafted:.2f} of {drafted} draft tokens" if drafted else ""
            print(f"  {name:<22}{rate:8.1f} tok/s  {rate / base:5.2f}x  {acceptance}")


if __name__ == "__main__":
    main()
