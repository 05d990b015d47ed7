"""Trainer ``lora``: the builtin SFT loop, training LoRA adapters on a frozen base, writing a PEFT adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch

from enigma.config import setting
from enigma.training.sft import SFTTrainer
from enigma_lora.adapter import apply_lora, merge_adapter, save_adapter, trainable_parameters
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


class LoRATrainer(SFTTrainer):
    """Fine-tune LoRA adapters; the base model's weights stay as they are."""

    def build(self, config: Any) -> tuple[torch.nn.Module, dict[str, Any], Path]:
        if not self._options(config).qlora:
            return super().build(config)
        from enigma.errors import ConfigError
        from enigma.loader import load_model
        from enigma_lora.nf4 import quantize_linears

        folder = Path(config.model).expanduser()
        if not folder.is_dir() or not any(folder.glob("*.safetensors")):
            raise ConfigError(f"--qlora fine-tunes a trained model; {config.model} is not a model folder with "
                              "weights")
        loaded = load_model(folder, dtype=torch.bfloat16)
        model = loaded.model
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        quantize_linears(model)
        return model.train(), loaded.hf_config, folder

    def prepare_model(self, model: torch.nn.Module, config: Any) -> torch.nn.Module:
        options = self._options(config)
        self.lora = options.lora_config(str(Path(config.model).expanduser().resolve()))
        self.merge = options.merge
        apply_lora(model, self.lora)
        self.trainable, self.total = trainable_parameters(model)
        return model

    def save_result(self, model: torch.nn.Module, hf_config: dict[str, Any], out: Path, *, tokenizer_folder: Path,
                    dtype: torch.dtype | None, generation_config: dict[str, Any]) -> None:
        import shutil

        save_adapter(model, out, self.lora, dtype=dtype, tokenizer_folder=tokenizer_folder)
        if self.merge:  # from the base's own files, so a QLoRA run merges into the unquantized weights
            shutil.rmtree(out / "merged", ignore_errors=True)  # a resumed run's earlier result
            merge_adapter(self.lora.base_model_name_or_path, out, output=out / "merged")

    @staticmethod
    def _options(config: Any) -> LoRAOptions:
        options = config.options
        return options if isinstance(options, LoRAOptions) else LoRAOptions(**dict(options or {}))
