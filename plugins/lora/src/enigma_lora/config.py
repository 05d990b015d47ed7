"""LoRA settings, and their form in PEFT's ``adapter_config.json``.

PEFT matches ``target_modules`` as PEFT does: a list names module suffixes
(``q_proj`` matches ``model.layers.0.self_attn.q_proj``), a string is a
regular expression the whole module name must match, and ``all-linear`` is
every Linear but the output head. ``rank_pattern`` and ``alpha_pattern``
give some modules another rank or alpha (keys are suffixes or regexes).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from enigma.errors import BadRequestError, ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
"""What PEFT puts before a module's name in adapter tensor keys."""
ALL_LINEAR = "all-linear"


def _positive(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadRequestError(f"LoRA {attribute.name} must be a positive integer, not {value!r}")


def _dropout(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise BadRequestError(f"LoRA dropout must be in [0, 1), not {value!r}")


@attrs.frozen
class LoRAConfig:
    """A LoRA adapter's shape: ``LoRAConfig(rank=8, alpha=16, target_modules=["q_proj", "v_proj"])``."""

    rank: int = attrs.field(default=8, validator=_positive)
    alpha: float = 16.0
    dropout: float = attrs.field(default=0.0, validator=_dropout)
    target_modules: str | tuple[str, ...] = attrs.field(
        default=("q_proj", "v_proj"), converter=lambda v: v if isinstance(v, str) else tuple(v))
    use_rslora: bool = False
    """Scale by alpha / sqrt(rank) instead of alpha / rank (rank-stabilized LoRA)."""
    rank_pattern: Mapping[str, int] = attrs.field(factory=dict)
    alpha_pattern: Mapping[str, float] = attrs.field(factory=dict)
    base_model_name_or_path: str | None = None

    def matches(self, module_name: str, *, is_output_head: bool = False) -> bool:
        """Whether the module of this name gets an adapter (PEFT's rule)."""
        targets = self.target_modules
        if targets == ALL_LINEAR:
            return not is_output_head
        if isinstance(targets, str):
            return re.fullmatch(targets, module_name) is not None
        return any(module_name == t or module_name.endswith("." + t) for t in targets)

    def rank_for(self, module_name: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_name, self.rank))

    def scaling_for(self, module_name: str) -> float:
        rank = self.rank_for(module_name)
        alpha = float(_pattern_value(self.alpha_pattern, module_name, self.alpha))
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def to_peft(self) -> dict[str, Any]:
        """``adapter_config.json`` as PEFT writes it, which ``peft.PeftModel.from_pretrained`` reads."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base_model_name_or_path,
                "r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": self.target_modules if isinstance(self.target_modules, str)
                else sorted(self.target_modules),
                "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
                "use_rslora": self.use_rslora, "use_dora": False, "rank_pattern": dict(self.rank_pattern),
                "alpha_pattern": dict(self.alpha_pattern), "modules_to_save": None, "layers_to_transform": None,
                "layers_pattern": None, "lora_bias": False, "revision": None}

    @classmethod
    def from_peft(cls, data: Mapping[str, Any], *, source: str = ADAPTER_CONFIG) -> LoRAConfig:
        """Read PEFT's ``adapter_config.json``; what enigma cannot apply is refused by name."""
        if data.get("peft_type", "LORA") != "LORA":
            raise ConfigError(f"{source}: peft_type {data.get('peft_type')!r} is not LORA; enigma applies LoRA "
                              "adapters only")
        refused = {"use_dora": "DoRA adapters", "fan_in_fan_out": "fan_in_fan_out (GPT-2 style Conv1D) adapters",
                   "modules_to_save": "modules_to_save (fully trained extra modules)",
                   "layers_to_transform": "layers_to_transform", "lora_bias": "LoRA biases"}
        for key, what in refused.items():
            if data.get(key):
                raise ConfigError(f"{source}: {what} are not supported yet ({key} = {data[key]!r})")
        if data.get("bias", "none") != "none":
            raise ConfigError(f"{source}: bias = {data['bias']!r} adapters train biases, which enigma does not "
                              "apply yet; only bias = 'none'")
        targets = data.get("target_modules")
        if not targets:
            raise ConfigError(f"{source} names no target_modules")
        return cls(rank=int(data.get("r", 8)), alpha=float(data.get("lora_alpha", 8)),
                   dropout=float(data.get("lora_dropout") or 0.0),
                   target_modules=targets if isinstance(targets, str) else tuple(targets),
                   use_rslora=bool(data.get("use_rslora", False)), rank_pattern=dict(data.get("rank_pattern") or {}),
                   alpha_pattern=dict(data.get("alpha_pattern") or {}),
                   base_model_name_or_path=data.get("base_model_name_or_path"))

    @classmethod
    def read(cls, folder: str | Path) -> LoRAConfig:
        path = Path(folder) / ADAPTER_CONFIG
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{folder} is not a LoRA adapter: it has no {ADAPTER_CONFIG}") from None
        except ValueError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc})") from exc
        return cls.from_peft(data, source=str(path))


def parse_targets(text: str | Sequence[str]) -> str | tuple[str, ...]:
    """``"q_proj,v_proj"`` -> ``("q_proj", "v_proj")``; ``"all-linear"`` stays."""
    if not isinstance(text, str):
        return tuple(text)
    if text.strip() == ALL_LINEAR:
        return ALL_LINEAR
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise BadRequestError("name at least one target module (q_proj,v_proj or all-linear)")
    return names


def _pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return default
