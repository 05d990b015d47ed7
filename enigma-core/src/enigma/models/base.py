"""What every model family shares with the loader: its tensors under checkpoint names.

A model's modules are named after the checkpoint's keys, so the model's own
state dict — parameters and persistent buffers — *is* the list of tensors
to read. A transform that swaps a module for a quantized one changes the
list (``q_proj.weight`` becomes ``q_proj.qweight`` and ``q_proj.scales``),
and the loader follows without knowing the format.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def persistent_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every parameter and persistent buffer, each tensor once
    (a head tied to the embeddings is listed under the embeddings' name only)."""
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        dotted = f"{prefix}." if prefix else ""
        for name, tensor in module._parameters.items():
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                yield dotted + name, tensor
        for name, tensor in module._buffers.items():
            if tensor is not None and name not in module._non_persistent_buffers_set and id(tensor) not in seen:
                seen.add(id(tensor))
                yield dotted + name, tensor


def checkpoint_tensors(model: torch.nn.Module, *, skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The model's tensors by checkpoint name, without those in ``skip`` (a tied head)."""
    skipped = set(skip)
    return {name: tensor for name, tensor in model.state_dict().items() if name not in skipped}
