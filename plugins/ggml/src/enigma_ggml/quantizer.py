"""Quantizer ``ggml``: a model into one GGUF file of a llama.cpp file type (Q4_K_M, Q8_0...)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from enigma.errors import BadRequestError, NotAvailableError
from enigma_ggml.recipe import FILE_TYPES
from enigma_ggml.weights import GGUF_FILE

DESCRIPTIONS = {
    "Q4_K_M": "llama.cpp's best balance: 4-bit k-quants, Q6_K for the head and some attn_v/ffn_down (~4.9 bpw)",
    "Q4_K_S": "4-bit k-quants, a few early attn_v/ffn_down at Q5_K (~4.6 bpw)",
    "Q5_K_M": "5-bit k-quants, Q6_K for the head and some attn_v/ffn_down (~5.7 bpw)",
    "Q5_K_S": "5-bit k-quants (~5.5 bpw)",
    "Q6_K": "6-bit k-quants, near-lossless (~6.6 bpw)",
    "Q8_0": "8-bit blocks of 32 (~8.5 bpw)",
    "F16": "16-bit floats",
    "F32": "32-bit floats, unquantized",
}


class GGMLQuantizer:
    """Writes GGUF files llama.cpp, Ollama and LM Studio load."""

    def types(self) -> Mapping[str, str]:
        return DESCRIPTIONS

    def quantize(self, model: Any, *, type: str, output: Path, options: Mapping[str, Any],
                 progress: Callable[[int, int], None] | None = None) -> None:
        from enigma_ggml.export import write_gguf
        from enigma_ggml.requantize import requantize_gguf
        from enigma_ggml.weights import gguf_path

        unknown = sorted(set(options) - {"name"})
        if unknown:
            raise BadRequestError(f"ggml's types take no option {', '.join(unknown)} (those are other "
                                  "quantizers'; --bpw, --head-bits and --calibration are EXL2's)")
        if type not in FILE_TYPES:
            raise BadRequestError(f"ggml makes no type {type!r}; it makes {', '.join(FILE_TYPES)}")
        method = (model.hf_config.get("quantization_config") or {}).get("quant_method")
        source_config = dict(model.hf_config)
        if method == "ggml":  # a GGUF: requantized as llama-quantize does (the caller warned)
            types = requantize_gguf(gguf_path(model.folder), output / GGUF_FILE, type, progress=progress)
            parameters = source_config.pop("quantization_config").get("parameters")
        elif model.quantization is not None:
            raise NotAvailableError(f"{model.folder} is quantized with {method!r}; GGUF files are made from float "
                                    "weights or from another GGUF")
        else:
            types = write_gguf(model.folder, output / GGUF_FILE, type,
                               name=str(options.get("name") or model.folder.name), progress=progress)
            parameters = None
        config = {**source_config, "quantization_config": {"quant_method": "ggml", "type": type, "file": GGUF_FILE,
                                                           "tensor_types": sorted(set(types.values())),
                                                           **({"parameters": parameters} if parameters else {})}}
        (output / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def transform(self, model: Any, *, context: Any) -> None:
        from enigma_ggml.loading import swap_packed_modules

        swap_packed_modules(model, context)
