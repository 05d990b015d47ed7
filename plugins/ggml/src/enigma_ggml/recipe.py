"""Which ggml type each tensor gets in a file type (Q4_K_M...): llama.cpp's ``llama_tensor_get_type``.

For the dense llama and qwen2 models this plugin writes, the rules are:

- only 2-D ``*.weight`` tensors that are not norms are quantized (the rest stay F32);
- F32 and F16 files store every such tensor as F32 or F16;
- the output head (or, with tied embeddings, the token embedding) is Q6_K, or Q8_0 when its rows do not
  divide into 256-value blocks (and Q8_0 in Q8_0 files);
- ``attn_v``: Q6_K in Q4_K_M and Q5_K_M files for the layers ``use_more_bits`` picks; Q5_K for the first
  four in Q4_K_S;
- ``ffn_down``: Q6_K in Q4_K_M and Q5_K_M for ``use_more_bits`` layers; Q5_K for the first eighth in Q4_K_S;
- a type whose block does not divide the rows falls back: Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0, and
  anything that still does not fit to F16.

``use_more_bits(i, n)`` is ``i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`` (integer division), counted over
the tensors of that kind in file order.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from enigma_ggml.quants import BLOCKS

FILE_TYPES = {"F32": ("F32", 0), "F16": ("F16", 1), "Q8_0": ("Q8_0", 7), "Q4_K_S": ("Q4_K", 14),
              "Q4_K_M": ("Q4_K", 15), "Q5_K_S": ("Q5_K", 16), "Q5_K_M": ("Q5_K", 17), "Q6_K": ("Q6_K", 18)}
"""Each file type's default tensor type and its ``general.file_type`` (llama.cpp's ``llama_ftype``)."""
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def use_more_bits(index: int, count: int) -> bool:
    return index < count // 8 or index >= 7 * count // 8 or (index - count // 8) % 3 == 2


@attrs.frozen
class TensorInfo:
    """A tensor by its GGUF name and numpy shape (``[rows, ne0]`` for a matrix)."""

    name: str
    shape: tuple[int, ...]


def tensor_types(file_type: str, tensors: Sequence[TensorInfo], *, tied_embeddings: bool) -> dict[str, str]:
    """The ggml type of every tensor, in the file type ``file_type``."""
    default, _ = FILE_TYPES[file_type]
    n_v = sum(1 for t in tensors if t.name.endswith("attn_v.weight"))
    n_down = sum(1 for t in tensors if t.name.endswith("ffn_down.weight"))
    i_v = i_down = 0
    chosen = {}
    for tensor in tensors:
        name = tensor.name
        if len(tensor.shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
            chosen[name] = "F32"
            continue
        if default in ("F32", "F16"):
            chosen[name] = default
            continue
        columns = tensor.shape[-1]
        kind = default
        if name == "output.weight" or (tied_embeddings and name == "token_embd.weight"):
            if columns % BLOCKS[kind][0]:
                kind = "Q8_0"
            elif kind != "Q8_0":
                kind = "Q6_K"
        elif name == "token_embd.weight":
            pass
        elif name.endswith("attn_v.weight"):
            if file_type in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_v, n_v):
                kind = "Q6_K"
            elif file_type == "Q4_K_S" and i_v < 4:
                kind = "Q5_K"
            i_v += 1
        elif name.endswith("ffn_down.weight"):
            if file_type in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_down, n_down):
                kind = "Q6_K"
            elif file_type == "Q4_K_S" and i_down < n_down // 8:
                kind = "Q5_K"
            i_down += 1
        if columns % BLOCKS[kind][0]:
            kind = FALLBACK.get(kind, kind)
            if columns % BLOCKS[kind][0]:
                kind = "F16"
        chosen[name] = kind
    return chosen
