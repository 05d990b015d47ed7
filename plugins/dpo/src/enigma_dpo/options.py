"""The ``dpo`` trainer's flags, apart from the trainer so that registering it imports no torch."""

from __future__ import annotations

import attrs

from enigma.config import setting

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
"""The preference losses, by TRL's names."""


@attrs.define
class DPOOptions:
    """``enigma train --method dpo`` flags: ``--beta 0.1 --loss sigmoid|ipo|hinge``, ``--lora`` (with
    ``--lora-rank``, ``--lora-alpha``, ``--lora-dropout``, ``--target``), ``--reference PATH``."""

    beta: float = setting(0.1, allowed="a positive number", check=lambda v: v > 0,
                          doc="how far the policy may move from the reference (DPO's β)")
    loss: str = setting("sigmoid", allowed="one of " + ", ".join(LOSS_TYPES), check=lambda v: v in LOSS_TYPES,
                        doc="the preference loss")
    lora: bool = setting(False, allowed="true or false", check=lambda v: isinstance(v, bool),
                         doc="train LoRA adapters (enigma-plugin-lora) instead of the whole model")
    lora_rank: int = setting(8, allowed="an integer of at least 1", check=lambda v: isinstance(v, int) and v >= 1,
                             doc="with --lora: the adapters' rank")
    lora_alpha: float = setting(16.0, allowed="a positive number", check=lambda v: v > 0,
                                doc="with --lora: the update is scaled by alpha / rank")
    lora_dropout: float = setting(0.0, allowed="a number in [0, 1)", check=lambda v: 0 <= v < 1,
                                  doc="with --lora: dropout on the adapters' input")
    target: str = setting("q_proj,v_proj", allowed="comma-separated module names, or all-linear",
                          check=lambda v: bool(str(v).strip()), doc="with --lora: which Linears get adapters")
    reference: str = setting("", allowed="a model folder, or empty", check=lambda v: isinstance(v, str),
                             doc="the reference model [the model training starts from]")
