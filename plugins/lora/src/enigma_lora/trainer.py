"""Trainer ``lora``: the builtin SFT loop, training LoRA adapters on a frozen base, writing a PEFT adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from enigma.training.sft import SFTTrainer
from enigma_lora.adapter import apply_lora, merge_adapter, save_adapter, trainable_parameters
from enigma_lora.options import LoRAOptions


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
