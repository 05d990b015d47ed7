"""enigma-plugin-lora: LoRA fine-tuning and PEFT adapters for enigma models.

The seed's names: ``LoRAConfig(rank=8, alpha=16, target_modules=["q_proj",
"v_proj"])``; ``apply_lora(model, config)`` wraps the targeted Linears;
``save_adapter(model, "my_adapter", config)`` writes a PEFT adapter folder;
``load_adapter(model, folder)`` applies one (PEFT-trained adapters too);
``merge_adapter(base, adapter, output=...)`` writes the merged model.
``enigma train --method lora`` trains one with the builtin loop.
"""

from enigma.lazy import lazy_exports

_LAZY = {**dict.fromkeys(("adapter_tensors", "apply_lora", "load_adapter", "merge_adapter", "merge_lora",
                          "read_adapter", "save_adapter", "trainable_parameters"), "enigma_lora.adapter"),
         "LoRAConfig": "enigma_lora.config", "LoRALinear": "enigma_lora.layers"}
"""Names imported on first use: the package is imported whenever plugins load (``enigma --help`` too), and
these modules bring torch."""

__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = ["LoRAConfig", "LoRALinear", "adapter_tensors", "apply_lora", "load_adapter", "merge_adapter",
           "merge_lora", "read_adapter", "save_adapter", "trainable_parameters"]
