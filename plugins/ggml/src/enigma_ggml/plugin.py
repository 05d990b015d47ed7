"""enigma-plugin-ggml's hooks: the ``ggml`` quantizer."""

from __future__ import annotations

from enigma import hookimpl


@hookimpl
def enigma_register_quantizers(register):
    register("ggml", "enigma_ggml.quantizer:GGMLQuantizer",
             summary="llama.cpp's GGUF files: Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, Q6_K, Q8_0, F16, F32")
