"""enigma-plugin-exl2's hooks: the ``exl2`` quantizer (which also loads EXL2 folders)."""

from __future__ import annotations

from enigma import hookimpl


@hookimpl
def enigma_register_quantizers(register):
    register("exl2", "enigma_exl2.quantizer:EXL2Quantizer",
             summary="exllamav2's EXL2: mixed-bit GPTQ at a target bits per weight (--bpw 2.5..8.0)")
