"""enigma-plugin-ggml: llama.cpp's quantization formats.

- :mod:`enigma_ggml.quants`: the block codecs. Q4_K, Q5_K and Q6_K quantized
  by the plugin's own C code to the same bytes as llama.cpp's reference
  quantizers; Q8_0, Q5_0, Q5_1 through the ``gguf`` package (llama.cpp's bytes
  too); dequantizing through ``gguf.quants``.
- :mod:`enigma_ggml.kernels`: every ggml type dequantized in torch (bit-equal to
  ``gguf.quants``); ``GGMLLinear``/``GGMLEmbedding``, modules whose weight stays in its bytes.
- :mod:`enigma_ggml.tokenizer`: tokenizers between GGUF metadata and ``tokenizers``, both ways.
- :mod:`enigma_ggml.recipe`: llama.cpp's per-tensor type choice for a file type.
- :mod:`enigma_ggml.names`: tensor names and the q/k row order, HF <-> llama.cpp.
- :mod:`enigma_ggml.export`, :mod:`enigma_ggml.requantize`: GGUF files llama.cpp loads, from a
  Llama/Mistral/Qwen2 folder or another GGUF; ``ggml_quantize(model, quant_type="Q4_K_M", output="x.gguf")``.
- :mod:`enigma_ggml.reading`, :mod:`enigma_ggml.importing`, :mod:`enigma_ggml.weights`,
  :mod:`enigma_ggml.loading`: GGUF files run in enigma (``LLM("x.gguf")``, ``enigma pull x.gguf``).
- The ``ggml`` quantizer: ``enigma quantize MODEL --type Q4_K_M`` (or ``--bits 4``).
"""

from enigma_ggml.export import ggml_quantize, write_gguf
from enigma_ggml.quants import BLOCKS, dequantize, quantize, row_bytes

__all__ = ["BLOCKS", "dequantize", "ggml_quantize", "quantize", "row_bytes", "write_gguf"]
