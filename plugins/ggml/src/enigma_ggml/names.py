"""Tensor names between Hugging Face checkpoints and llama.cpp's GGUF files, and the q/k row order.

llama.cpp's converter renames every tensor (``model.layers.3.self_attn.q_proj.weight`` is
``blk.3.attn_q.weight``) and, for architecture ``llama`` only, reorders the rows of q and k
(and their biases) per head: HF rotates the two halves of a head, llama.cpp adjacent pairs.
The reorder moves whole rows, so it applies to quantized bytes as well as to floats.
"""

from __future__ import annotations

import re

import numpy as np

from enigma.errors import BadRequestError

LAYER_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
               "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
               "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
               "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
               "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
               "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
HF_LAYER_NAMES = {gguf: hf for hf, gguf in LAYER_NAMES.items()}
HF_TOP_NAMES = {gguf: hf for hf, gguf in TOP_NAMES.items()}
ROPE_FREQS = "rope_freqs.weight"
"""Llama 3's per-frequency rope divisors, a tensor rather than config."""


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name of an HF tensor; None for tensors llama.cpp does not read (rotary buffers)."""
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if match and match[2] in LAYER_NAMES:
        return f"blk.{match[1]}.{LAYER_NAMES[match[2]]}"
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    raise BadRequestError(f"tensor {hf_name!r} has no GGUF name for llama/qwen2; this model is not one llama.cpp's "
                          "llama or qwen2 architecture reads")


def hf_name(name: str) -> str | None:
    """The HF checkpoint name of a GGUF tensor of a llama/qwen2 file; None for names it does not know."""
    if name in HF_TOP_NAMES:
        return HF_TOP_NAMES[name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if match and match[2] in HF_LAYER_NAMES:
        return f"model.layers.{match[1]}.{HF_LAYER_NAMES[match[2]]}"
    return None


def permute_for_rope(rows: np.ndarray, heads: int) -> np.ndarray:
    """Rows of q or k (or their bias) from HF's rotate-half layout to llama.cpp's adjacent pairs, per head."""
    count = rows.shape[0]
    return rows.reshape(heads, 2, count // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def unpermute_for_rope(rows: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of :func:`permute_for_rope`: llama.cpp's q/k rows back in HF's order."""
    count = rows.shape[0]
    return rows.reshape(heads, count // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
