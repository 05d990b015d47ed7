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

TORCH_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
"""Types dequantized by tensor operations here; any other type ggml has goes through ``gguf.quants``."""


def block_shape(type_name: str) -> tuple[int, int]:
    """(values, bytes) of one block of a ggml type, any type the ``gguf`` package knows."""
    import gguf

    try:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    except KeyError:
        raise BadRequestError(f"unknown ggml type {type_name!r}; known: "
                              f"{', '.join(t.name for t in gguf.GGMLQuantizationType)}") from None


def _dequantize_numpy(data: torch.Tensor, type_name: str) -> torch.Tensor:
    """The ``gguf`` package's dequantizer, for types without a torch one here (Q2_K, Q3_K, the IQ types)."""
    import gguf

    values = gguf.quants.dequantize(data.cpu().numpy(), gguf.GGMLQuantizationType[type_name])
    return torch.from_numpy(values.astype("float32", copy=False)).to(data.device)


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
    values, size = block_shape(type_name)
    if type_name == "F32":
        return data.contiguous().view(torch.float32).clone()
    if type_name == "F16":
        return data.contiguous().view(torch.float16).float()
    if type_name == "BF16":
        return data.contiguous().view(torch.bfloat16).float()
    if type_name not in TORCH_TYPES:
        return _dequantize_numpy(data, type_name)
    shape = data.shape
    blocks = data.reshape(-1, size)
    n = blocks.shape[0]
    if type_name == "Q8_0":
        out = blocks[:, 2:].contiguous().view(torch.int8).float() * _half(blocks[:, :2])
    elif type_name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        offset = 4 if type_name in ("Q4_1", "Q5_1") else 2
        has_high = type_name in ("Q5_0", "Q5_1")
        qs = blocks[:, offset + 4 * has_high:]
        q = torch.cat([qs & 0xF, qs >> 4], dim=1)                              # [n, 32]: low nibbles first
        if has_high:
            shifts = torch.arange(8, dtype=torch.uint8, device=data.device).reshape(1, 1, 8)
            high = ((blocks[:, offset:offset + 4].reshape(n, 4, 1) >> shifts) & 1).reshape(n, 32)
            q = q | (high << 4)
        d = _half(blocks[:, :2])
        if type_name in ("Q4_0", "Q5_0"):
            out = d * (q.to(torch.int8) - (8 if type_name == "Q4_0" else 16)).float()
        else:
            out = d * q.float() + _half(blocks[:, 2:4])
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


def packed_row_bytes(type_name: str, values: int) -> int:
    """Bytes of a row of ``values`` values in ``type_name``."""
    per_block, size = block_shape(type_name)
    if values % per_block:
        raise BadRequestError(f"{type_name} packs rows in blocks of {per_block} values; a row of {values} does not "
                              "divide")
    return values // per_block * size


class GGMLLinear(nn.Module):
    """``y = x Wᵀ + b`` with W held as ``type_name`` bytes (``qweight``: uint8 ``[out, row_bytes]``)."""

    keeps_dtype = True

    def __init__(self, in_features: int, out_features: int, type_name: str, *, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.type_name = in_features, out_features, type_name
        self.register_buffer("qweight", torch.empty(out_features, packed_row_bytes(type_name, in_features),
                                                    dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    def weight_values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_blocks(self.qweight, self.type_name).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight_values(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.type_name}"


class GGMLEmbedding(nn.Module):
    """An embedding table held as ``type_name`` bytes; only the rows looked up are dequantized."""

    keeps_dtype = True

    def __init__(self, num_embeddings: int, embedding_dim: int, type_name: str, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.type_name = num_embeddings, embedding_dim, type_name
        self.dtype = dtype or torch.get_default_dtype()
        self.register_buffer("qweight", torch.empty(num_embeddings, packed_row_bytes(type_name, embedding_dim),
                                                    dtype=torch.uint8, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize_blocks(self.qweight[ids.reshape(-1)], self.type_name)
        return rows.reshape(*ids.shape, self.embedding_dim).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.type_name}"


class TiedGGMLHead(nn.Module):
    """An output head that reads a :class:`GGMLEmbedding`'s bytes (a GGUF without ``output.weight``)."""

    keeps_dtype = True

    def __init__(self, embedding: GGMLEmbedding) -> None:
        super().__init__()
        self.__dict__["embedding"] = embedding  # not a submodule: its bytes load once, under the embedding's name
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize_blocks(self.embedding.qweight, self.embedding.type_name).to(x.dtype))

    def extra_repr(self) -> str:
        return f"tied to the embedding, {self.embedding.type_name}"
