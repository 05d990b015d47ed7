"""ggml's block types dequantized in torch, and ``GGMLLinear``: a Linear whose weight stays in its GGUF bytes.

The dequantizers unpack the block layouts of ggml-common.h with tensor
operations (no loops over blocks), in float32 and in the same order of
operations as the ``gguf`` package's numpy ones, so the values are equal bit
for bit (the tests compare them). ``GGMLLinear`` dequantizes its weight for
each matmul — correct first: memory stays at the file's size, speed is the
next step's work (fused dequantize-matmul kernels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from enigma.errors import BadRequestError
from enigma_ggml.quants import BLOCKS


def _half(column: torch.Tensor) -> torch.Tensor:
    """Two bytes per row as one float16, widened to float32: ``[n, 2]`` uint8 -> ``[n, 1]``."""
    return column.contiguous().view(torch.float16).float()


def _scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's eight 6-bit scales and mins from their 12 bytes: ``[n, 12]`` -> two ``[n, 8]``."""
    low, high = packed[:, :4], packed[:, 4:8]
    tail = packed[:, 8:]
    scales = torch.cat([low & 63, (tail & 0xF) | ((low >> 6) << 4)], dim=1)
    mins = torch.cat([high & 63, (tail >> 4) | ((high >> 6) << 4)], dim=1)
    return scales.float(), mins.float()


def dequantize_blocks(data: torch.Tensor, type_name: str) -> torch.Tensor:
    """uint8 ``[..., row_bytes]`` of ``type_name`` -> float32 ``[..., values]``."""
    if type_name not in BLOCKS:
        raise BadRequestError(f"unknown ggml type {type_name!r}; known: {', '.join(BLOCKS)}")
    values, size = BLOCKS[type_name]
    if type_name == "F32":
        return data.contiguous().view(torch.float32).clone()
    if type_name == "F16":
        return data.contiguous().view(torch.float16).float()
    shape = data.shape
    blocks = data.reshape(-1, size)
    n = blocks.shape[0]
    if type_name == "Q8_0":
        out = blocks[:, 2:].contiguous().view(torch.int8).float() * _half(blocks[:, :2])
    elif type_name in ("Q4_K", "Q5_K"):
        d, dmin = _half(blocks[:, 0:2]), _half(blocks[:, 2:4])
        scales, mins = _scales_mins(blocks[:, 4:16])
        qs = blocks[:, 16:144] if type_name == "Q4_K" else blocks[:, 48:176]
        chunks = qs.reshape(n, 4, 1, 32)
        q = torch.cat([chunks & 0xF, chunks >> 4], dim=2).reshape(n, 8, 32)
        if type_name == "Q5_K":
            shifts = torch.arange(8, dtype=torch.uint8, device=data.device).reshape(1, 8, 1)
            q = q | (((blocks[:, 16:48].reshape(n, 1, 32) >> shifts) & 1) << 4)
        out = ((d * scales).reshape(n, 8, 1) * q.float() - (dmin * mins).reshape(n, 8, 1)).reshape(n, 256)
    elif type_name == "Q6_K":
        ql, qh = blocks[:, :128].reshape(n, 2, 64), blocks[:, 128:192].reshape(n, 2, 32)
        scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
        d = _half(blocks[:, 208:210])
        q = torch.stack([(ql[..., :32] & 0xF) | (((qh >> 0) & 3) << 4), (ql[..., 32:] & 0xF) | (((qh >> 2) & 3) << 4),
                         (ql[..., :32] >> 4) | (((qh >> 4) & 3) << 4), (ql[..., 32:] >> 4) | (((qh >> 6) & 3) << 4)],
                        dim=2).reshape(n, 16, 16)
        out = ((d * scales).reshape(n, 16, 1) * (q.to(torch.int8) - 32).float()).reshape(n, 256)
    else:
        raise BadRequestError(f"{type_name} has no torch dequantizer yet")
    return out.reshape(*shape[:-1], shape[-1] // size * values)


class GGMLLinear(nn.Module):
    """``y = x Wᵀ + b`` with W held as ``type_name`` bytes (``qweight``: uint8 ``[out, row_bytes]``)."""

    keeps_dtype = True

    def __init__(self, in_features: int, out_features: int, type_name: str, *, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        from enigma_ggml.quants import row_bytes

        self.in_features, self.out_features, self.type_name = in_features, out_features, type_name
        self.register_buffer("qweight", torch.empty(out_features, row_bytes(type_name, in_features),
                                                    dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    def weight_values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_blocks(self.qweight, self.type_name).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight_values(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.type_name}"
