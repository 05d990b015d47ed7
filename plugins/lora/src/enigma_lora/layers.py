"""``LoRALinear``: a frozen Linear plus a trainable low-rank update, ``y = W x + b + s · B A x``.

It keeps a plain base Linear's ``weight`` and ``bias`` as its own
parameters, so the model's base checkpoint names do not change
(``...q_proj.weight``); any other base (QLoRA's :class:`~enigma_lora.nf4.NF4Linear`)
is kept whole as ``base_layer``. It adds ``lora_A`` (rank x in,
Kaiming-uniform) and ``lora_B`` (out x rank, zeros: training starts from the
base model) as PEFT lays them out. Being a subclass of ``nn.Linear`` but not
an ``nn.Linear`` exactly, a backend leaves it unfused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Linear):
    """``base`` with a LoRA update of ``rank`` scaled by ``scaling``."""

    def __init__(self, base: nn.Module, *, rank: int, scaling: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        if type(base) is nn.Linear:
            self.weight, self.bias = base.weight, base.bias
            self.base_layer = None
            factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        else:  # a quantized base: the adapter trains in float32 beside it
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
            self.base_layer = base
            factory = {"device": next(iter(base.buffers())).device, "dtype": torch.float32}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        self.scaling = scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        if factory["device"].type != "meta":
            self.reset_lora_parameters()

    @property
    def rank(self) -> int:
        return self.lora_A.out_features

    def reset_lora_parameters(self) -> None:
        """PEFT's initialization: A Kaiming-uniform (a = √5, as nn.Linear), B zeros."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """The update to ``weight`` that merging adds: ``scaling · B @ A``."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def base_weight(self) -> torch.Tensor:
        """The base's weight as a float tensor (dequantized for a quantized base)."""
        return self.weight if self.base_layer is None else self.base_layer.dequantized(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, self.bias) if self.base_layer is None else self.base_layer(x)
        if self.merged:
            return result
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        if update.dtype == result.dtype:
            return result.add_(update, alpha=self.scaling)  # the base's output is not kept for backward
        return result + (update * self.scaling).to(result.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"scaling={self.scaling:g}"
