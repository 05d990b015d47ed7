"""Running one decoder layer of a Llama-family model on calibration states, block by block.

The states are ``[rows, length, hidden]`` (one calibration row per sequence);
attention is causal within each row (the training attention: no KV cache).
Work goes a few rows at a time so memory stays bounded on large models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from enigma.models.rope import cos_sin
from enigma.training.attention import training_context

ROWS_PER_PASS = 4


class LayerRunner:
    """Runs a model's layers' two blocks (``x + attn(norm(x))``, ``h + mlp(norm(h))``) on state rows."""

    def __init__(self, model: nn.Module, length: int) -> None:
        self.model = model
        self.length = length
        positions = torch.arange(length).repeat(ROWS_PER_PASS)
        self._cos, self._sin = cos_sin(positions, model.inv_freq, torch.float32)

    def _context(self, rows: int):
        return training_context(self.model.num_layers, rows, self.length)

    def attention(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x + self_attn(input_layernorm(x))`` for ``x`` ``[rows, length, hidden]``."""
        return self._map(x, lambda flat, rows: flat + layer.self_attn(
            layer.input_layernorm(flat), self._cos[:flat.shape[0]], self._sin[:flat.shape[0]], self._context(rows)))

    def mlp(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return self._map(h, lambda flat, rows: flat + layer.mlp(layer.post_attention_layernorm(flat)))

    def _map(self, states: torch.Tensor, fn: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
        out = torch.empty_like(states)
        with torch.no_grad():
            for start in range(0, states.shape[0], ROWS_PER_PASS):
                chunk = states[start:start + ROWS_PER_PASS]
                rows = chunk.shape[0]
                out[start:start + rows] = fn(chunk.reshape(-1, chunk.shape[-1]), rows).reshape(chunk.shape)
        return out


@contextmanager
def recording_inputs(modules: dict[str, nn.Module], record: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Calls ``record(name, input)`` with each named module's input while the block runs."""
    handles = [module.register_forward_pre_hook(lambda _m, args, name=name: record(name, args[0]))
               for name, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def swapped_weights(modules: dict[str, nn.Linear], weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """The modules' weights replaced by ``weights`` (by name) while the block runs."""
    saved = {name: modules[name].weight.data for name in weights}
    try:
        for name, weight in weights.items():
            modules[name].weight.data = weight
        yield
    finally:
        for name, weight in saved.items():
            modules[name].weight.data = weight


def relative_accuracy(output: torch.Tensor, reference: torch.Tensor) -> float:
    """exllamav2's measure: ``1 - mean over rows of ‖y - y_ref‖ / ‖y_ref‖`` (floored at 1e-6)."""
    flat, ref = output.reshape(output.shape[0], -1), reference.reshape(reference.shape[0], -1)
    errors = (flat - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)
    return max(1e-6, 1.0 - float(errors.mean()))
