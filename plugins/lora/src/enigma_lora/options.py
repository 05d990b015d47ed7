"""The ``lora`` trainer's flags, apart from the trainer so that registering it imports no torch."""

from __future__ import annotations

import attrs

from enigma.config import setting
from enigma_lora.config import LoRAConfig, parse_targets


def _targets_ok(value: str) -> bool:
    try:
        parse_targets(value)
    except Exception:
        return False
    return True


@attrs.define
class LoRAOptions:
    """``enigma train --method lora`` flags: ``--lora-rank 8 --lora-alpha 16 --lora-dropout 0.05 --target
    q_proj,v_proj --rslora --merge`` (and ``[train.options]`` in a training TOML)."""

    rank: int = setting(8, allowed="an integer of at least 1", check=lambda v: isinstance(v, int) and v >= 1,
                             doc="rank r of each adapter")
    alpha: float = setting(16.0, allowed="a positive number", check=lambda v: v > 0,
                                doc="the update is scaled by alpha / r")
    dropout: float = setting(0.0, allowed="a number in [0, 1)", check=lambda v: 0 <= v < 1,
                                  doc="dropout on the adapters' input")
    target: str = setting("q_proj,v_proj", allowed="comma-separated module names, or all-linear",
                          check=_targets_ok, doc="which Linear modules get adapters")
    rslora: bool = setting(False, allowed="true or false", check=lambda v: isinstance(v, bool),
                           doc="scale by alpha / sqrt(r) (rank-stabilized LoRA)")
    merge: bool = setting(False, allowed="true or false", check=lambda v: isinstance(v, bool),
                          doc="also write the base with the adapter merged in, to <out>/merged (in the base's "
                              "dtype)")
    qlora: bool = setting(False, allowed="true or false", check=lambda v: isinstance(v, bool),
                          doc="hold the frozen base in 4-bit NF4 with double quantization, bfloat16 elsewhere "
                              "(QLoRA)")

    def lora_config(self, base: str | None = None) -> LoRAConfig:
        return LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                          target_modules=parse_targets(self.target), use_rslora=self.rslora,
                          base_model_name_or_path=base)
