"""Structured output's cost: decode steps at batch 16 with every sequence held to a JSON schema, against
the same batch unconstrained, in one run.

    python benchmarks/structured_output.py      # --batch 16 --items 48 --rounds 3

Two models: enigma-tiny (its own 4,096-token vocabulary), and the 110M benchmark Llama with a
32,000-token byte-level BPE trained here on the Python documentation (llama-sized vocabularies make
masks dearer). Every sequence must write a JSON array of ``--items`` digits; the unconstrained batch
generates as many tokens (``ignore_eos``). Prints seconds per decode step and the overhead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import BENCH_LLAMA  # noqa: E402

DOCS = Path.home() / ".cache" / "enigma-test-oracles" / "python3.11-doc"
CACHE = Path.home() / ".cache" / "enigma-bench"


def bpe_32k_model() -> Path:
    """The benchmark Llama with a 32k BPE trained on the Python docs (made once, cached)."""
    folder = CACHE / "llama110m-bpe32k"
    if (folder / "config.json").exists():
        return folder
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [path.read_text(errors="ignore") for path in DOCS.rglob("*.txt")]
    if not texts:
        raise SystemExit(f"no Python docs under {DOCS}: run tests/plugins/rag once (it fetches python3.11-doc)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    config = transformers.LlamaConfig(**{**BENCH_LLAMA, "vocab_size": tokenizer.get_vocab_size()},
                                      bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


def timed(llm, params, prompts) -> tuple[float, int]:
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - started
    return elapsed, max(len(output.outputs[0].token_ids) for output in outputs)


def measure(name: str, model: str | Path, batch: int, items: int, rounds: int) -> None:
    from enigma import LLM, SamplingParams

    llm = LLM(model)
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": items,
              "maxItems": items}
    prompts = [[5 + index, 17, 42 + index] for index in range(batch)]
    guided = [SamplingParams(temperature=1.0, seed=index, max_tokens=4 * items, guided_decoding={"json": schema})
              for index in range(batch)]
    timed(llm, guided, prompts)  # warm-up: kernels, the grammar compiled
    _, steps = timed(llm, guided, prompts)
    free = [SamplingParams(temperature=1.0, seed=index, max_tokens=steps, ignore_eos=True) for index in range(batch)]
    timed(llm, free, prompts)
    best = {"constrained": float("inf"), "free": float("inf")}
    for _ in range(rounds):
        for kind, params in (("constrained", guided), ("free", free)):
            elapsed, generated = timed(llm, params, prompts)
            best[kind] = min(best[kind], elapsed / generated)
    overhead = best["constrained"] / best["free"] - 1
    print(f"{name}: batch {batch}, {steps} decode steps; per step {best['free'] * 1000:.2f} ms free, "
          f"{best['constrained'] * 1000:.2f} ms constrained: overhead {overhead * 100:+.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    measure("enigma-tiny (vocab 4,096)", "enigma-tiny", args.batch, args.items, args.rounds)
    measure("llama 110M (vocab 32,000)", bpe_32k_model(), args.batch, args.items, args.rounds)


if __name__ == "__main__":
    main()
