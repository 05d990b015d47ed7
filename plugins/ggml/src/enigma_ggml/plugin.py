"""enigma-plugin-ggml's hooks: the ``ggml`` quantizer, the ``gguf`` weight source, GGUF files as models."""

from __future__ import annotations

from enigma import hookimpl


@hookimpl
def enigma_register_quantizers(register):
    register("ggml", "enigma_ggml.quantizer:GGMLQuantizer",
             summary="llama.cpp's GGUF files: Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, Q6_K, Q8_0, F16, F32")


@hookimpl
def enigma_register_weight_sources(register):
    register("gguf", "enigma_ggml.weights:GGUFSource", priority=10,
             summary="GGUF files (llama.cpp, Ollama, LM Studio); weights stay in their blocks")


@hookimpl
def enigma_import_model_file(path, folder):
    if path.suffix.lower() != ".gguf":
        return None
    from enigma_ggml.importing import import_gguf

    import_gguf(path, folder)
    return True
