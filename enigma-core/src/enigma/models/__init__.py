"""Model definitions, one file per family, and finding the class a config.json names.

Families are registered as the ``architecture`` kind (the
``enigma_register_architectures`` hook), the builtin ones included: the
``architectures`` entry of a Hugging Face ``config.json`` names the class,
and :func:`architecture_class` lists the installed ones when it is not among
them. What the loader and the engine call on a model class:

``from_hf_config(hf_config)``
    build the module tree (the loader calls it on the meta device, weight
    initialisation skipped); module names are the checkpoint's tensor names.
``post_materialize()``
    tie weights and compute non-persistent buffers once tensors have memory.
``CHECKPOINT_PREFIXES``
    optional: prefixes some checkpoints put before the names (``"bert."``).

Causal LMs add ``forward(input_ids, positions, context)`` → hidden states,
``compute_logits(hidden)``, ``num_layers``, ``kv_shape`` ((kv_heads,
head_dim) per layer), ``config.vocab_size``, ``config.max_position_embeddings``
and ``checkpoint_tensors()`` (for saving).
"""

from __future__ import annotations

from typing import Any

from enigma.errors import NotFoundError


def architecture_class(hf_config: dict[str, Any], *, source: str = "config.json", host: Any = None) -> tuple[str, type]:
    """``(architecture, class)``: the first architecture a config declares that an
    installed family implements; NotFoundError listing the installed ones otherwise."""
    if host is None:
        from enigma.plugins import get_host

        host = get_host()
    registered = {impl.name: impl for impl in host.registry.implementations("architecture")}
    declared = hf_config.get("architectures") or []
    for name in declared:
        if name in registered:
            return name, registered[name].load()
    shown = ", ".join(declared) if declared else "none"
    supported = ", ".join(sorted(registered)) or "none (is enigma-core's builtin 'llama' plugin disabled?)"
    raise NotFoundError(f"{source} declares architectures [{shown}], which no installed model family "
                        f"implements; supported: {supported}")
