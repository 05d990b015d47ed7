"""Trainer ``dpo``: Direct Preference Optimization in the builtin training loop, on the full model or LoRA.

The reference model is the model training starts from. Its log-probabilities
of every pair are computed once before the first step (TRL's
``precompute_ref_log_probs``), so no second copy of the model is held — for
LoRA the starting model is the base with zero-initialized adapters, i.e. the
base. ``--reference PATH`` scores with another model instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from enigma.datasets import expand_sources
from enigma.errors import ConfigError
from enigma.training.attention import training_context
from enigma.training.sft import SFTTrainer, StepLoss
from enigma_dpo.data import PreferenceData, collate, read_preferences
from enigma_dpo.loss import completion_logps, dpo_loss
from enigma_dpo.options import DPOOptions

logger = logging.getLogger("enigma.dpo")


class DPOTrainer(SFTTrainer):
    """Preference optimization on ``prompt``/``chosen``/``rejected`` pairs (see :mod:`enigma_dpo.data`)."""

    def prepare_model(self, model: torch.nn.Module, config: Any) -> torch.nn.Module:
        self.options = _options(config)
        self.lora = None
        if self.options.lora:
            try:
                from enigma_lora import apply_lora
                from enigma_lora.options import LoRAOptions
            except ImportError:
                raise ConfigError("--lora needs enigma-plugin-lora: pip install enigma-plugin-lora") from None
            options = LoRAOptions(rank=self.options.lora_rank, alpha=self.options.lora_alpha,
                                  dropout=self.options.lora_dropout, target=self.options.target)
            self.lora = options.lora_config(str(Path(config.model).expanduser().resolve()))
            apply_lora(model, self.lora)
        return model

    def load_data(self, config: Any, tokenizer: Any, model: torch.nn.Module) -> PreferenceData:
        files = expand_sources(config.data)
        pairs = read_preferences(files, tokenizer, max_length=config.seq_len)
        pad_id = next(iter(tokenizer.eos_token_ids), 0)
        if self.options.reference and any(pair.ref_chosen_logps is None for pair in pairs):
            from enigma.loader import load_model

            reference = load_model(Path(self.options.reference).expanduser(), dtype=torch.float32).model
        else:
            reference = model
        if any(pair.ref_chosen_logps is None for pair in pairs):
            self.score_reference(reference, pairs, pad_id, batch_size=config.batch_size)
        if reference is not model:
            del reference
        return PreferenceData(pairs, pad_id=pad_id, val_fraction=config.val_fraction)

    @staticmethod
    def score_reference(model: torch.nn.Module, pairs: list, pad_id: int, *, batch_size: int) -> None:
        """Fill each pair's reference log-probabilities (no gradients, dropout off)."""
        pairs = [pair for pair in pairs if pair.ref_chosen_logps is None]  # the others came with theirs
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for begin in range(0, len(pairs), batch_size):
                chunk = pairs[begin:begin + batch_size]
                batch = collate(chunk, pad_id)
                logps = sequence_logps(model, batch)
                for pair, chosen, rejected in zip(chunk, logps[:len(chunk)], logps[len(chunk):]):
                    pair.ref_chosen_logps, pair.ref_rejected_logps = float(chosen), float(rejected)
        model.train(was_training)

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepLoss:
        logps = sequence_logps(model, batch)
        pairs = logps.shape[0] // 2
        lengths, reference = batch["lengths"], batch["ref_logps"]
        loss, metrics = dpo_loss(logps[:pairs], logps[pairs:], reference[:pairs], reference[pairs:],
                                 beta=self.options.beta, loss_type=self.options.loss,
                                 chosen_lengths=lengths[:pairs], rejected_lengths=lengths[pairs:])
        return StepLoss(loss, pairs, int(batch["input_ids"].numel()), metrics)

    def save_result(self, model: torch.nn.Module, hf_config: dict[str, Any], out: Path, *, tokenizer_folder: Path,
                    dtype: torch.dtype | None, generation_config: dict[str, Any]) -> None:
        if self.lora is None:
            return super().save_result(model, hf_config, out, tokenizer_folder=tokenizer_folder, dtype=dtype,
                                       generation_config=generation_config)
        from enigma_lora import save_adapter

        save_adapter(model, out, self.lora, dtype=dtype, tokenizer_folder=tokenizer_folder)


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each sequence's summed completion log-probability under ``model``."""
    input_ids = batch["input_ids"]
    rows, length = input_ids.shape
    positions = torch.arange(length).repeat(rows)
    hidden = model(input_ids.reshape(-1), positions, training_context(model.num_layers, rows, length))
    logits = model.compute_logits(hidden).view(rows, length, -1)
    return completion_logps(logits, input_ids, batch["completion_mask"])


def _options(config: Any) -> DPOOptions:
    options = config.options
    return options if isinstance(options, DPOOptions) else DPOOptions(**dict(options or {}))
