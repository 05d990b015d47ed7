"""The seed's call, ``quantize_model_exl2(model, tokenizer, calibration_texts, target_bpw=4.0)``, on enigma's
quantizer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def quantize_model_exl2(model: str | Path, tokenizer: Any = None, calibration_texts: Sequence[str] | None = None,
                        target_bpw: float = 4.0, *, head_bits: int = 6, output: str | Path | None = None,
                        name: str | None = None, progress: Callable[[int, int], None] | None = None,
                        **options: Any) -> Path:
    """Quantize ``model`` (a store name or a Hugging Face folder) to EXL2 at ``target_bpw`` bits per weight.

    ``calibration_texts`` are strings (default: the Python docs' tutorial). The model's own tokenizer cuts
    them into rows; ``tokenizer`` is accepted for the seed's signature only. The result goes to ``output``
    (a new folder) or into the store as ``name`` (default ``<model>:exl2``); the path is returned. Other
    keyword arguments are the quantizer's options (``calibration_rows``, ``calibration_length``,
    ``measurement``, ``work_dir``).
    """
    from enigma.quantize import quantize

    del tokenizer
    chosen = {"bpw": target_bpw, "head_bits": head_bits, **options}
    if calibration_texts is not None:
        chosen["calibration_texts"] = list(calibration_texts)
    return quantize(model, "exl2:EXL2", name=name, output=output, options=chosen, progress=progress)
