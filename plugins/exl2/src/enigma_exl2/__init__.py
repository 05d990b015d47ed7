"""enigma-plugin-exl2: exllamav2's EXL2 format for enigma — made by measurement and GPTQ, and run.

``quantize_model_exl2`` is the seed's call; ``enigma quantize MODEL --type exl2
--bpw 4.0`` the command. The modules: :mod:`~enigma_exl2.layout` (the tensors,
bit packing, a reference dequantizer), :mod:`~enigma_exl2.gptq`,
:mod:`~enigma_exl2.qparams` (recipes and their bits), :mod:`~enigma_exl2.convert`
(measure, optimise, quantize), :mod:`~enigma_exl2.kernels` (running them).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "quantize_model_exl2"]


def __getattr__(name: str):
    if name == "quantize_model_exl2":
        from enigma_exl2.seed import quantize_model_exl2

        return quantize_model_exl2
    raise AttributeError(name)
