"""Model definitions, one file per family, and the architectures they cover.

The ``architectures`` entry of a Hugging Face ``config.json`` picks the
class; :func:`model_class` names the supported ones when it is not among them.
"""

from __future__ import annotations

import importlib
from typing import Any

from enigma.errors import NotFoundError

ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "enigma.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "enigma.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "enigma.models.llama:LlamaForCausalLM",
    "BertModel": "enigma.models.bert:BertModel",
}
"""Hugging Face architecture name -> ``"module:class"`` implementing it."""


def architecture_of(hf_config: dict[str, Any], *, source: str = "config.json") -> str:
    """The single architecture a config declares, checked against what enigma supports."""
    declared = hf_config.get("architectures") or []
    supported = ", ".join(sorted(ARCHITECTURES))
    for name in declared:
        if name in ARCHITECTURES:
            return name
    shown = ", ".join(declared) if declared else "none"
    raise NotFoundError(f"{source} declares architectures [{shown}], which enigma does not support; "
                        f"supported: {supported}")


def model_class(architecture: str) -> type:
    """The class implementing a supported architecture."""
    module_name, _, class_name = ARCHITECTURES[architecture].partition(":")
    return getattr(importlib.import_module(module_name), class_name)
