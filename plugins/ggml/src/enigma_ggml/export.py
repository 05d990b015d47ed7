"""Writing a Hugging Face Llama/Qwen2 folder as a GGUF file llama.cpp loads, tensor by tensor.

The container is the ``gguf`` package's ``GGUFWriter``: the header, the
metadata and every tensor's description go first, then each tensor is read
from the folder (memory-mapped), renamed to llama.cpp's names, permuted where
llama.cpp's rotary layout needs it (q and k of arch ``llama``: HF rotates
halves, llama.cpp adjacent pairs), quantized to the type :mod:`enigma_ggml.recipe`
picks, and appended. The tokenizer goes in as llama.cpp reads it
(:mod:`enigma_ggml.tokenizer`): byte-level BPE (``gpt2``, with the name of
its pre-tokenizer) or SentencePiece (``llama``, scores from the merge ranks),
with token types, special token ids, ``add_bos`` and the chat template.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from enigma.errors import BadRequestError, NotAvailableError
from enigma_ggml.names import ROPE_FREQS, gguf_name, permute_for_rope
from enigma_ggml.quants import quantize, row_bytes
from enigma_ggml.recipe import FILE_TYPES, TensorInfo, tensor_types

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


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
    if rope_type not in (None, "default", "linear", "llama3"):
        raise NotAvailableError(f"{folder}: rope_scaling {rope_type!r} is not written to GGUF yet (linear and "
                                "llama3 are)")
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
        rope_freqs = _rope_freqs(config, head_dim) if rope_type == "llama3" else None
        if rope_freqs is not None:  # llama.cpp reads Llama 3's rescaling as a tensor of divisors
            writer.add_tensor_info(ROPE_FREQS, rope_freqs.shape, rope_freqs.dtype, rope_freqs.nbytes)
        add_tensor_infos(writer, infos, types)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if rope_freqs is not None:
            writer.write_tensor_data(rope_freqs)
        for done, (hf, g) in enumerate(order, start=1):
            tensor = weights.get(hf).float().numpy()
            if architecture == "llama" and (".attn_q." in g or ".attn_k." in g):
                tensor = permute_for_rope(tensor, heads if ".attn_q." in g else kv_heads)
            writer.write_tensor_data(encode(tensor, types[g]))
            if progress is not None:
                progress(done, len(order))
    writer.close()
    return types


def add_tensor_infos(writer: Any, infos: list[TensorInfo], types: dict[str, str]) -> None:
    """Describe each tensor at its chosen type, in order (the data follows in the same order)."""
    import gguf

    for info in infos:
        kind = types[info.name]
        columns = info.shape[-1]
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        dtype = {"F32": np.float32, "F16": np.float16}.get(kind, np.uint8)
        shape = info.shape if kind in ("F32", "F16") else (*info.shape[:-1], row_bytes(kind, columns))
        writer.add_tensor_info(info.name, shape, np.dtype(dtype), rows * row_bytes(kind, columns),
                               raw_dtype=None if kind in ("F32", "F16") else gguf.GGMLQuantizationType[kind])


def encode(values: np.ndarray, kind: str) -> np.ndarray:
    """float32 values as a tensor's data in ``kind``: block bytes, or F16/F32 values."""
    if kind in ("F32", "F16"):
        return np.ascontiguousarray(values.astype(np.float16 if kind == "F16" else np.float32))
    return np.ascontiguousarray(quantize(values, kind))


def _rope_freqs(config: dict[str, Any], head_dim: int) -> np.ndarray:
    """Llama 3's rope rescaling as llama.cpp's per-frequency divisors: plain over rescaled frequencies."""
    from enigma.models.rope import inverse_frequencies

    theta = float(config.get("rope_theta", 10000.0))
    plain = inverse_frequencies(head_dim, theta, None)
    scaled = inverse_frequencies(head_dim, theta, config["rope_scaling"])
    return (plain / scaled).numpy().astype(np.float32)


def _file_order(name: str) -> tuple[int, int, str]:
    """convert_hf_to_gguf's order: the embedding, the layers in order, then the final norm and head."""
    match = re.match(r"blk\.(\d+)\.", name)
    if match:
        return (1, int(match[1]), name)
    return (0 if name == "token_embd.weight" else 2, 0, name)


def _add_tokenizer(writer: Any, folder: Path, config: dict[str, Any]) -> None:
    import gguf

    from enigma_ggml.tokenizer import vocabulary_from_tokenizer_json

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise NotAvailableError(f"{folder} has no tokenizer.json; GGUF export needs the model's tokenizer")
    vocabulary = vocabulary_from_tokenizer_json(json.loads(path.read_text(encoding="utf-8")), config["vocab_size"],
                                                source=str(path))
    writer.add_tokenizer_model(vocabulary.model)
    if vocabulary.pre is not None:
        writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    if vocabulary.scores is not None:
        writer.add_token_scores(vocabulary.scores)
    writer.add_token_types(vocabulary.types)
    if vocabulary.add_space_prefix is not None:
        writer.add_add_space_prefix(vocabulary.add_space_prefix)
    gguf.SpecialVocab(folder, load_merges=vocabulary.model == "gpt2", n_vocab=len(vocabulary.tokens)).add_to_gguf(
        writer, quiet=True)
    template = folder / "chat_template.jinja"
    if template.is_file():
        writer.add_chat_template(template.read_text(encoding="utf-8"))


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
