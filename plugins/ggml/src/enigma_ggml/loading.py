"""Loading a GGUF model: each Linear and the embedding swapped for one that keeps its GGUF bytes.

The quantizer's ``transform`` runs on the model built (on the meta device)
from the folder's config.json. It reads the GGUF header — types only, no
tensor data — and replaces every module whose weight is packed in the file
(quantized, or F16) with :class:`~enigma_ggml.kernels.GGMLLinear` or
:class:`~enigma_ggml.kernels.GGMLEmbedding` of that tensor's type, so memory
stays at the file's size. A head tied to a packed embedding becomes a
:class:`~enigma_ggml.kernels.TiedGGMLHead` reading the same bytes. F32
tensors keep the model's own modules.
"""

from __future__ import annotations

from typing import Any

import attrs
from torch import nn

from enigma.errors import NotFoundError
from enigma_ggml.kernels import GGMLEmbedding, GGMLLinear, TiedGGMLHead


def swap_packed_modules(model: nn.Module, context: Any) -> int:
    """Swap ``model``'s modules for GGUF-backed ones per the folder's GGUF file; returns how many."""
    from enigma_ggml.reading import GGUFModelFile
    from enigma_ggml.weights import gguf_path

    path = gguf_path(context.folder)
    if path is None or not path.is_file():
        raise NotFoundError(f"{context.folder} is a GGUF model folder without its GGUF file "
                            f"({(context.quantization or {}).get('file', '*.gguf')}); fetch the model again")
    file = GGUFModelFile(path)
    file.check_shapes({name: tuple(tensor.shape) for name, tensor in model.state_dict().items()
                       if not name.endswith("inv_freq")})
    swapped = 0
    for name, module in list(model.named_modules()):
        tensor = file.tensors.get(f"{name}.weight")
        if tensor is None or not tensor.packed:
            continue
        if isinstance(module, nn.Linear):
            replacement: nn.Module = GGMLLinear(module.in_features, module.out_features, tensor.type_name,
                                                bias=module.bias is not None, device="meta")
        elif isinstance(module, nn.Embedding):
            replacement = GGMLEmbedding(module.num_embeddings, module.embedding_dim, tensor.type_name,
                                        dtype=context.dtype, device="meta")
        else:
            continue
        _replace(model, name, replacement)
        swapped += 1
    config = getattr(model, "config", None)
    embedding = _find(model, "model.embed_tokens")
    if getattr(config, "tie_word_embeddings", False) and isinstance(embedding, GGMLEmbedding):
        _replace(model, "lm_head", TiedGGMLHead(embedding))
        model.config = attrs.evolve(config, tie_word_embeddings=False)  # the head reads the embedding's bytes
    return swapped


def _find(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
