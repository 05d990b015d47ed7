"""Writing a Hugging Face Llama/Qwen2 folder as a GGUF file llama.cpp loads, tensor by tensor.

The container is the ``gguf`` package's ``GGUFWriter``: the header, the
metadata and every tensor's description go first, then each tensor is read
from the folder (memory-mapped), renamed to llama.cpp's names, permuted where
llama.cpp's rotary layout needs it (q and k of arch ``llama``: HF rotates
halves, llama.cpp adjacent pairs), quantized to the type :mod:`enigma_ggml.recipe`
picks, and appended. The tokenizer goes in as llama.cpp reads it: a
byte-level BPE (``tokenizer.ggml.model = gpt2``) with its tokens, token types
and merges, special token ids, ``add_bos`` and the chat template.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from enigma.errors import BadRequestError, NotAvailableError
from enigma_ggml.quants import quantize, row_bytes
from enigma_ggml.recipe import FILE_TYPES, TensorInfo, tensor_types

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
LAYER_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
               "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
               "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
               "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
               "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
               "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4


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


def permute_for_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of q or k (or their bias) from HF's rotate-half layout to llama.cpp's adjacent pairs, per head."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape))


def write_gguf(folder: Path, target: Path, file_type: str, *, name: str | None = None,
               progress: Callable[[int, int], None] | None = None) -> dict[str, str]:
    """Write ``folder`` (an HF Llama/Mistral/Qwen2 folder) to ``target`` as ``file_type``; returns each
    tensor's ggml type."""
    import gguf

    from enigma.weights import SafetensorsWeights

    if file_type not in FILE_TYPES:
        raise BadRequestError(f"unknown GGUF file type {file_type!r}; choose {', '.join(FILE_TYPES)}")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    architecture = ARCHITECTURES.get((config.get("architectures") or [None])[0])
    if architecture is None:
        raise NotAvailableError(f"{folder}: architecture {config.get('architectures')} cannot be written as GGUF "
                                f"yet; supported: {', '.join(ARCHITECTURES)}")
    scaling = config.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in (None, "default", "linear"):
        raise NotAvailableError(f"{folder}: rope_scaling {rope_type!r} is not written to GGUF yet (linear is)")
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    tied = bool(config.get("tie_word_embeddings", False))
    writer = gguf.GGUFWriter(str(target), architecture)
    writer.add_name(name or folder.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_file_type(FILE_TYPES[file_type][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, folder, config)

    with SafetensorsWeights(folder) as weights:
        names = [(hf, gguf_name(hf)) for hf in weights.keys()]
        names = [(hf, g) for hf, g in names if g is not None]
        order = sorted(names, key=lambda item: _file_order(item[1]))
        infos = [TensorInfo(g, tuple(weights.shape(hf))) for hf, g in order]
        types = tensor_types(file_type, infos, tied_embeddings=tied)
        for info in infos:
            kind = types[info.name]
            columns = info.shape[-1]
            rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
            dtype = {"F32": np.float32, "F16": np.float16}.get(kind, np.uint8)
            shape = info.shape if kind in ("F32", "F16") else (*info.shape[:-1], row_bytes(kind, columns))
            writer.add_tensor_info(info.name, shape, np.dtype(dtype), rows * row_bytes(kind, columns),
                                   raw_dtype=None if kind in ("F32", "F16") else gguf.GGMLQuantizationType[kind])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, (hf, g) in enumerate(order, start=1):
            tensor = weights.get(hf).float().numpy()
            if architecture == "llama" and (".attn_q." in g or ".attn_k." in g):
                tensor = permute_for_rope(tensor, heads if ".attn_q." in g else kv_heads)
            writer.write_tensor_data(np.ascontiguousarray(quantize(tensor, types[g]) if types[g] not in ("F32", "F16")
                                                          else tensor.astype(np.float16 if types[g] == "F16"
                                                                             else np.float32)))
            if progress is not None:
                progress(done, len(order))
    writer.close()
    return types


def _file_order(name: str) -> tuple[int, int, str]:
    """convert_hf_to_gguf's order: the embedding, the layers in order, then the final norm and head."""
    match = re.match(r"blk\.(\d+)\.", name)
    if match:
        return (1, int(match[1]), name)
    return (0 if name == "token_embd.weight" else 2, 0, name)


def _add_tokenizer(writer: Any, folder: Path, config: dict[str, Any]) -> None:
    import gguf

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise NotAvailableError(f"{folder} has no tokenizer.json; GGUF export needs the model's tokenizer")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE" or not _byte_level(data):
        raise NotAvailableError(f"{path}: only byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2 style) are written "
                                f"to GGUF yet; this one is {model.get('type')}")
    vocab: dict[str, int] = dict(model.get("vocab", {}))
    added = {token["content"]: token for token in data.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    size = max(config["vocab_size"], max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED until seen
    for content, index in vocab.items():
        tokens[index] = content
        if content in added:
            types[index] = TOKEN_CONTROL if added[content].get("special") else TOKEN_USER_DEFINED
        else:
            types[index] = TOKEN_NORMAL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=size).add_to_gguf(writer, quiet=True)
    template = folder / "chat_template.jinja"
    if template.is_file():
        writer.add_chat_template(template.read_text(encoding="utf-8"))


def _byte_level(data: dict[str, Any]) -> bool:
    def has(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has(v) for v in node.values())
        if isinstance(node, list):
            return any(has(v) for v in node)
        return False

    return has(data.get("pre_tokenizer")) or has(data.get("decoder"))


def ggml_quantize(model: Any, quant_type: str = "Q4_K_M", *, output: str | Path,
                  hf_config: dict[str, Any] | None = None, tokenizer_folder: str | Path | None = None) -> Path:
    """The seed's ``ggml_quantize(model, quant_type=...)``: ``model`` (a folder, or an in-memory enigma model with
    its ``hf_config`` and a ``tokenizer_folder``) written to the GGUF file ``output``, atomically."""
    import os
    import tempfile

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".enigma-gguf-", dir=output.parent) as scratch:
        if isinstance(model, (str, Path)):
            folder = Path(model)
        else:
            from enigma.saving import save_model_folder

            if hf_config is None or tokenizer_folder is None:
                raise BadRequestError("an in-memory model needs its hf_config and tokenizer_folder")
            folder = save_model_folder(model, hf_config, Path(scratch) / "model", tokenizer_folder=tokenizer_folder)
        staged = Path(scratch) / output.name
        write_gguf(folder, staged, quant_type, name=output.stem)
        os.replace(staged, output)
    return output
