"""Shared pieces of the benchmarks: a ~100M-parameter random Llama folder."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# Llama-architecture, ~110M parameters: GPT-2-small sized, tied embeddings.
BENCH_LLAMA = {
    "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_key_value_heads": 12, "vocab_size": 32000, "max_position_embeddings": 2048,
    "tie_word_embeddings": True, "initializer_range": 0.02,
}


def make_bench_model(folder: Path | None = None, **overrides) -> Path:
    """Save the benchmark Llama (random weights, fp32) with a small BPE tokenizer."""
    import torch
    import transformers
    from tiny_models import write_tokenizer

    folder = Path(folder or tempfile.mkdtemp(prefix="enigma-bench-"))
    write_tokenizer(folder)
    config = transformers.LlamaConfig(**{**BENCH_LLAMA, **overrides}, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    # the tokenizer knows fewer ids than the model; prompts use token ids directly
    (folder / "bench.json").write_text(json.dumps({"parameters": sum(p.numel() for p in model.parameters())}))
    return folder


def parameters(folder: Path) -> int:
    return json.loads((folder / "bench.json").read_text())["parameters"]
