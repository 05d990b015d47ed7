"""Builtin plugin ``llama``: the Llama family (Llama 2/3, Mistral, Qwen2, TinyLlama, SmolLM)."""

from __future__ import annotations

from enigma import hookimpl


@hookimpl
def enigma_register_architectures(register):
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        register(name, "enigma.models.llama:LlamaForCausalLM", summary="decoder-only Llama-family causal LM")
