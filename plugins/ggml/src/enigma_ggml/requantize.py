"""A GGUF file to another file type, as llama.cpp's ``llama-quantize`` does it.

Every metadata key is copied as it is (tokenizer, chat template, rope
settings) except the file type; each tensor is dequantized to float32 and
quantized again at the type the recipe picks for the new file type. Rows stay
in the file's (llama.cpp's) order: quantization works row by row, so the q/k
permutation needs no undoing. Going from a quantized file loses twice — the
caller warns; from an F32 or F16 file it is as good as from the original.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from enigma.errors import BadRequestError
from enigma_ggml.export import add_tensor_infos, encode
from enigma_ggml.recipe import FILE_TYPES, TensorInfo, tensor_types

SKIPPED_KEYS = ("general.architecture", "general.file_type", "general.quantization_version")


def requantize_gguf(source: Path, target: Path, file_type: str, *,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, str]:
    """Write the GGUF ``source`` again as ``file_type`` to ``target``; returns each tensor's type."""
    import gguf

    from enigma_ggml.kernels import dequantize_blocks
    from enigma_ggml.reading import GGUFModelFile

    if file_type not in FILE_TYPES:
        raise BadRequestError(f"unknown GGUF file type {file_type!r}; choose {', '.join(FILE_TYPES)}")
    file = GGUFModelFile(source)
    reader = file.reader
    writer = gguf.GGUFWriter(str(target), file.architecture)
    for field in reader.fields.values():
        if field.name in SKIPPED_KEYS:
            continue
        writer.add_key_value(field.name, field.value, gguf.GGUFValueType(field.value_type),
                             sub_type=None if field.item_type is None else gguf.GGUFValueType(field.item_type))
    writer.add_file_type(FILE_TYPES[file_type][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tensors = list(reader.tensors)
    infos = [TensorInfo(t.name, tuple(int(d) for d in reversed(t.dims))) for t in tensors]
    types = tensor_types(file_type, infos, tied_embeddings=not any(t.name == "output.weight" for t in tensors))
    add_tensor_infos(writer, infos, types)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    import torch

    for done, (tensor, info) in enumerate(zip(tensors, infos), start=1):
        kind = gguf.GGMLQuantizationType(tensor.type_id).name
        raw = torch.from_numpy(np.array(tensor.data))  # a copy: the map is read-only
        if kind != "F32":
            raw = raw.view(torch.uint8)
        values = dequantize_blocks(raw, kind).numpy().reshape(info.shape)
        writer.write_tensor_data(encode(values, types[info.name]))
        if progress is not None:
            progress(done, len(tensors))
    writer.close()
    return types
