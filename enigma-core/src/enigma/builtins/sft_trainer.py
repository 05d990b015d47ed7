"""Builtin plugin ``sft``: the reference trainer (full fine-tuning and pre-training)."""

from __future__ import annotations

from enigma import hookimpl


@hookimpl
def enigma_register_trainers(register):
    register("sft", "enigma.training.sft:SFTTrainer", priority=0,
             summary="full fine-tuning and pre-training on text, instruction and chat data")
