"""How an embedding-model folder pools: sentence-transformers' files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from enigma.errors import ConfigError
from enigma.models.bert import POOLING_MODES, Pooling

_POOLING_TYPE = "sentence_transformers.models.Pooling"
_NORMALIZE_TYPE = "sentence_transformers.models.Normalize"


def read_pooling(folder: Path) -> Pooling:
    """The Pooling (and Normalize) modules.json declares; mean pooling when there is none."""
    modules_file = folder / "modules.json"
    if not modules_file.exists():
        return Pooling("mean", normalize=False)
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    mode, normalize = "mean", False
    for module in modules:
        if module.get("type") == _POOLING_TYPE:
            config = json.loads((folder / module.get("path", "") / "config.json").read_text(encoding="utf-8"))
            chosen = [name for name in POOLING_MODES if config.get(f"pooling_mode_{name}_tokens")
                      or config.get(f"pooling_mode_{name}_token")]
            if len(chosen) != 1:
                raise ConfigError(f"{folder / module.get('path', '')}/config.json selects pooling modes {chosen}; "
                                  f"enigma supports exactly one of {', '.join(POOLING_MODES)}")
            mode = chosen[0]
        elif module.get("type") == _NORMALIZE_TYPE:
            normalize = True
    return Pooling(mode, normalize)


def read_max_seq_length(folder: Path, hf_config: dict[str, Any]) -> int:
    """Inputs are truncated to this many tokens (sentence_bert_config.json, else the model's limit)."""
    config_file = folder / "sentence_bert_config.json"
    if config_file.exists():
        value = json.loads(config_file.read_text(encoding="utf-8")).get("max_seq_length")
        if value:
            return int(value)
    return int(hf_config.get("max_position_embeddings", 512))
