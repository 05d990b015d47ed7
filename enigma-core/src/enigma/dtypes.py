"""The floating-point dtypes enigma runs and saves in: one table, names and aliases.

Imports torch only when a ``torch.dtype`` is asked for, so the config layer
can validate names without it.
"""

from __future__ import annotations

from typing import Any

NAMES = ("float32", "float16", "bfloat16")
"""What config.json's ``torch_dtype`` and ``engine.dtype`` call them."""
ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
"""Short names (``enigma train --dtype bf16``) for the same dtypes."""


def canonical(name: str) -> str | None:
    """``"bf16"`` -> ``"bfloat16"``; None for a name that is not one of :data:`NAMES` or an alias."""
    name = ALIASES.get(str(name), str(name))
    return name if name in NAMES else None


def torch_dtype(name: str) -> Any:
    """The ``torch.dtype`` of a name or alias (a KeyError for an unknown one)."""
    import torch

    found = canonical(name)
    if found is None:
        raise KeyError(name)
    return getattr(torch, found)


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (what config.json records)."""
    return str(dtype).removeprefix("torch.")
