"""The ``gguf`` weight source: a folder's GGUF file read as checkpoint tensors.

Tensors that stay packed (2-D, a type other than F32: every quantized
weight, and F16 ones) are offered as ``<module>.qweight``, uint8
``[rows, row_bytes]``, which is what :class:`enigma_ggml.kernels.GGMLLinear`
and ``GGMLEmbedding`` hold; the rest (norms, biases, F32 weights) as float32
under their HF names. For architecture ``llama`` the rows of q and k are put
back in HF's order (:func:`enigma_ggml.names.unpermute_for_rope`), bytes and
all. Nothing is read until a tensor is asked for: the file is memory-mapped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from enigma_ggml.names import unpermute_for_rope

GGUF_FILE = "model.gguf"
PACKED_SUFFIX = ".qweight"


def gguf_path(folder: Path) -> Path | None:
    """The GGUF file of a model folder: config.json's ``quantization_config.file``, else its only ``*.gguf``."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        named = (config.get("quantization_config") or {}).get("file")
    except (OSError, ValueError, AttributeError):
        named = None
    if named:
        return folder / named
    found = sorted(folder.glob("*.gguf"))
    return found[0] if len(found) == 1 else None


def checkpoint_name(tensor: Any) -> str:
    """The name a GGUF tensor loads under: ``.qweight`` for packed ones."""
    return tensor.hf_name.removesuffix(".weight") + PACKED_SUFFIX if tensor.packed else tensor.hf_name


class GGUFWeights:
    """The tensors of one GGUF model file, by the names an enigma model built from it uses."""

    def __init__(self, path: Path) -> None:
        from enigma_ggml.reading import GGUFModelFile

        self.file = GGUFModelFile(path)
        self.heads = self.file.heads()
        self._by_name = {checkpoint_name(tensor): tensor for tensor in self.file}

    def __enter__(self) -> GGUFWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self._by_name.clear()
        self.file = None  # drops the reader and its memory map

    def keys(self) -> Iterator[str]:
        return iter(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def shape(self, name: str) -> tuple[int, ...]:
        from enigma_ggml.kernels import packed_row_bytes

        tensor = self._by_name[name]
        return (tensor.shape[0], packed_row_bytes(tensor.type_name, tensor.shape[1])) if tensor.packed else tensor.shape

    def type_name(self, name: str) -> str:
        """The tensor's ggml type."""
        return self._by_name[name].type_name

    def get(self, name: str) -> Any:
        import torch

        from enigma_ggml.kernels import dequantize_blocks

        tensor = self._by_name[name]
        data = np.asarray(tensor.data)
        if self.file.architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
            data = unpermute_for_rope(data, self.heads[0] if ".q_proj." in name else self.heads[1])
        values = torch.from_numpy(np.array(data))  # a copy: the map closes with the file
        if tensor.type_name == "F32":
            return values.reshape(tensor.shape)
        raw = values.view(torch.uint8) if values.dtype != torch.uint8 else values  # F16/BF16 come as values
        if tensor.packed:
            return raw.reshape(tensor.shape[0], -1)
        return dequantize_blocks(raw, tensor.type_name).reshape(tensor.shape)


class GGUFSource:
    """The ``gguf`` weight source."""

    description = "a GGUF file (model.gguf, as `enigma pull x.gguf` stores it)"

    def matches(self, folder: Path) -> bool:
        path = gguf_path(folder)
        return path is not None and path.is_file()

    def open(self, folder: Path) -> GGUFWeights:
        return GGUFWeights(gguf_path(folder))
