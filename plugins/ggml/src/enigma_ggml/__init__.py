"""enigma-plugin-ggml: llama.cpp's quantization formats.

Today: the block codecs (:mod:`enigma_ggml.quants`) — Q4_K, Q5_K and Q6_K
quantized by enigma's own native code to the same bytes as llama.cpp's
reference quantizers, Q8_0/F16/F32 through the ``gguf`` package, and every
type dequantized by ``gguf.quants``. The GGUF writer and weight source, the
``Q4_K_M``-style type mixes and ``enigma quantize`` build on them (issue #14).
"""

from enigma_ggml.quants import BLOCKS, dequantize, quantize, row_bytes

__all__ = ["BLOCKS", "dequantize", "quantize", "row_bytes"]
