"""enigma-plugin-dpo's hook: the ``dpo`` trainer."""

from __future__ import annotations

from enigma import hookimpl


@hookimpl
def enigma_register_trainers(register):
    from enigma_dpo.options import DPOOptions

    register("dpo", "enigma_dpo.trainer:DPOTrainer", options=DPOOptions,
             summary="Direct Preference Optimization on prompt/chosen/rejected pairs (sigmoid, ipo, hinge)")
