"""Serving LoRA adapters per request, several in one batch, without merging them.

At load time (``LLM(base, adapters={name: folder})``) every Linear that any of
the adapters adapts becomes a :class:`MultiLoRALinear`: the base matmul for
all tokens, then for each adapter present in the step one grouped pair of
matmuls over the rows of its requests (gathered, multiplied by ``A`` then
``B``, scaled and added back) — S-LoRA's "gather per adapter" batching. Which
chunk of the flat batch runs with which adapter comes from the step's
:class:`~enigma.attention.ForwardContext` (``adapters``). Adapter weights are
read when first used and kept for at most ``max_loras`` adapters, the least
recently used evicted first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from enigma.attention import ForwardContext, current_forward_context
from enigma.errors import BadRequestError
from enigma_lora.adapter import read_adapter


class AdapterRegistry:
    """The adapters a model serves (``model.adapters``), loaded on use, at most ``max_loras`` at a time."""

    def __init__(self, folders: Mapping[str, str | Path], *, max_loras: int = 4) -> None:
        if max_loras < 1:
            raise BadRequestError(f"max_loras must be at least 1, not {max_loras}")
        self.folders = {name: Path(folder) for name, folder in folders.items()}
        self.max_loras = max_loras
        self.loaded: OrderedDict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = OrderedDict()
        self.loads = 0
        """How many times an adapter's weights were read (a measure of eviction churn)."""
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.shapes: dict[str, tuple[int, int]] = {}
        """The adaptable modules: name -> (in_features, out_features)."""
        self._groups: tuple[ForwardContext, list[tuple[str, torch.Tensor]]] | None = None

    def names(self) -> list[str]:
        return list(self.folders)

    def add(self, name: str, folder: str | Path) -> None:
        """Serve another adapter; it must adapt only modules this model was wrapped for."""
        if name in self.folders:
            raise BadRequestError(f"an adapter named {name!r} is already served ({self.folders[name]})")
        self.check(name, Path(folder), self.shapes)
        self.folders[name] = Path(folder)

    @staticmethod
    def check(name: str, folder: Path, shapes: Mapping[str, tuple[int, int]]) -> set[str]:
        """The modules the adapter in ``folder`` adapts, each checked against ``shapes``."""
        _, tensors = read_adapter(folder)
        modules = set()
        for key, tensor in tensors.items():
            module_name, _, part = key.rpartition(".")
            if module_name not in shapes:
                raise BadRequestError(f"adapter {name!r} ({folder}) adapts {module_name}, which this model cannot "
                                      "adapt (not one of its Linears, or not prepared for adapters: load the "
                                      "model with enable_lora=True); it may be for another base model")
            in_features, out_features = shapes[module_name]
            rank = tensor.shape[0] if part == "lora_A" else tensor.shape[1]
            expected = (rank, in_features) if part == "lora_A" else (out_features, rank)
            if tuple(tensor.shape) != expected:
                raise BadRequestError(f"adapter {name!r}: {key}.weight is {list(tensor.shape)} but this model's "
                                      f"{module_name} needs {list(expected)}; it was trained for another base model")
            modules.add(module_name)
        return modules

    def weights(self, name: str, *, keep: set[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """An adapter's ``{module: (A, B, scaling)}`` on the model's device, read now if it is not loaded;
        evicts the least recently used adapters not in ``keep`` beyond ``max_loras``."""
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return self.loaded[name]
        config, tensors = read_adapter(self.folders[name])
        found = {}
        for key in {k.rsplit(".", 1)[0] for k in tensors}:
            a, b = tensors[f"{key}.lora_A"], tensors[f"{key}.lora_B"]
            found[key] = (a.to(self.device, self.dtype), b.to(self.device, self.dtype), config.scaling_for(key))
        self.loaded[name] = found
        self.loads += 1
        for old in list(self.loaded):
            if len(self.loaded) <= self.max_loras:
                break
            if old not in keep:
                del self.loaded[old]
        return found

    def groups(self, context: ForwardContext) -> list[tuple[str, torch.Tensor]]:
        """The step's rows by adapter: ``[(name, row indices)]`` (cached for the step)."""
        if self._groups is not None and self._groups[0] is context:
            return self._groups[1]
        rows: dict[str, list[int]] = {}
        start = 0
        for adapter, length in zip(context.adapters, context.metadata.query_lens):
            if adapter is not None:
                rows.setdefault(adapter, []).extend(range(start, start + length))
            start += length
        groups = [(name, torch.tensor(index, device=self.device)) for name, index in rows.items()]
        self._groups = (context, groups)
        return groups


class MultiLoRALinear(nn.Linear):
    """A base Linear plus, per step, each batch chunk's adapter update; the base's names are kept."""

    def __init__(self, base: nn.Linear, module_name: str, registry: AdapterRegistry) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.module_name = module_name
        self.__dict__["registry"] = registry  # shared by every adapted Linear; not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, self.bias)
        context = current_forward_context()
        if context is None or not context.adapters:
            return result
        registry: AdapterRegistry = self.__dict__["registry"]
        groups = registry.groups(context)
        present = {name for name, _ in groups}
        for name, rows in groups:
            adapted = registry.weights(name, keep=present).get(self.module_name)
            if adapted is None:
                continue
            a, b, scaling = adapted
            update = (x.index_select(0, rows) @ a.t()) @ b.t()
            result.index_add_(0, rows, update.to(result.dtype), alpha=scaling)
        return result


def wrap_for_serving(model: nn.Module, folders: Mapping[str, Any], *, max_loras: int, device: torch.device,
                     dtype: torch.dtype, all_linear: bool = False) -> AdapterRegistry:
    """Make the Linears the adapters adapt — every Linear but the output head with ``all_linear`` —
    :class:`MultiLoRALinear` (on the meta device, before the weights load) and give the model its
    registry; errors name the adapter tensor that does not fit the model."""
    registry = AdapterRegistry(folders, max_loras=max_loras)
    registry.device, registry.dtype = device, dtype
    linears = {name: module for name, module in model.named_modules() if type(module) is nn.Linear}
    shapes = {name: (m.in_features, m.out_features) for name, m in linears.items()}
    wanted: set[str] = set()
    for name, folder in registry.folders.items():
        wanted |= registry.check(name, folder, shapes)
    if all_linear:
        wanted |= {name for name in linears if name.split(".")[-1] != "lm_head"}
    for module_name in sorted(wanted):
        parent, _, attribute = module_name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attribute, MultiLoRALinear(linears[module_name], module_name, registry))
    registry.shapes = {name: shapes[name] for name in wanted}
    model.adapters = registry
    return registry
