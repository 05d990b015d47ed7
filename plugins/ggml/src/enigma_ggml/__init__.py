"""enigma-plugin-ggml: llama.cpp's quantization formats.

- :mod:`enigma_ggml.quants`: the block codecs. Q4_K, Q5_K and Q6_K quantized
  by the plugin's own C code to the same bytes as llama.cpp's reference
  quantizers; Q8_0, Q5_0, Q5_1 through the ``gguf`` package (llama.cpp's bytes
  too); dequantizing through ``gguf.quants``.
- :mod:`enigma_ggml.kernels`: the same types dequantized in torch (bit-equal to
  ``gguf.quants``) and ``GGMLLinear``, a Linear whose weight stays in its bytes.
- :mod:`enigma_ggml.tokenizer`: a GGUF's byte-level BPE tokenizer rebuilt from its metadata.
- :mod:`enigma_ggml.recipe`: llama.cpp's per-tensor type choice for a file type.
- :mod:`enigma_ggml.export`: a Llama/Mistral/Qwen2 folder as a GGUF file llama.cpp
  loads; ``ggml_quantize(model, quant_type="Q4_K_M", output="x.gguf")``.
- The ``ggml`` quantizer: ``enigma quantize MODEL --type Q4_K_M`` (or ``--bits 4``).

Not yet: running GGUF files in enigma (the weight source and loading through
``GGMLLinear``).
"""

from enigma_ggml.export import ggml_quantize, write_gguf
from enigma_ggml.quants import BLOCKS, dequantize, quantize, row_bytes

__all__ = ["BLOCKS", "dequantize", "ggml_quantize", "quantize", "row_bytes", "write_gguf"]
