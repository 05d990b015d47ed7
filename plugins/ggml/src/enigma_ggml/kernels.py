"""ggml's block types in torch, and modules whose weights stay in their GGUF bytes.

The dequantizers unpack the block layouts of ggml-common.h with tensor
operations (no loops over blocks), in float32 and in the same order of
operations as the ``gguf`` package's numpy ones, so the values are equal bit
for bit (the tests compare them).

``GGMLLinear`` multiplies few rows (a decode step) with ``qmatmul.c``: the
activations quantized per block (Q8_K, or Q8_0 for Q8_0 weights) and integer
dot products against the weight's blocks, as llama.cpp's CPU backend does —
memory traffic is the file's bytes. Many rows (a prefill, a large batch): the
weight is dequantized a piece at a time into a reused buffer and each piece
multiplied. Other types, other devices, or no C compiler: the weight is
dequantized whole and ``F.linear`` runs.
"""

from __future__ import annotations

import threading
from typing import Any

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


NATIVE_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
"""Types ``qmatmul.c`` multiplies in their blocks, with ggml's type number."""
DEQUANTIZED_TYPES = ("Q8_0", "Q4_K", "Q5_K", "Q6_K")
"""Types ``qmatmul.c`` also dequantizes (for prefill); the rest go through the torch dequantizers."""
NATIVE_MAX_ROWS = 16
"""Up to this many rows go through the block kernels; more amortise a dequantized copy (measured:
benchmarks/llamacpp.py)."""
_native: dict[str, Any] = {}


def native_qmatmul() -> Any:
    """The compiled ``qmatmul.c`` (ctypes), or None where it cannot be built or native kernels are off."""
    if "library" not in _native:
        _native["library"] = _load_qmatmul()
    return _native["library"]


def _load_qmatmul() -> Any:
    import ctypes
    import logging

    from enigma.config import load_config
    from enigma.native import NativeBuildError, build
    from enigma.paths import get_paths

    if not load_config().config.engine.native_kernels:
        return None
    try:
        path = build(get_paths().cache_dir / "native", package=__package__, source_name="qmatmul.c",  # no FMA
                     name="enigma-ggml-qmatmul", flags=("-ffp-contract=off",), headers=("ggml_common.h",))
        library = ctypes.CDLL(str(path))
    except (NativeBuildError, OSError) as error:
        logging.getLogger(__name__).warning("GGUF block kernels unavailable, dequantizing per matmul: %s", error)
        return None
    library.enigma_qmatmul.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                       ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_int]
    library.enigma_qmatmul.restype = ctypes.c_int
    library.enigma_dequantize.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                          ctypes.c_void_p, ctypes.c_int]
    library.enigma_dequantize.restype = ctypes.c_int
    library.enigma_activation_row_bytes.argtypes = [ctypes.c_int, ctypes.c_int64]
    library.enigma_activation_row_bytes.restype = ctypes.c_int64
    return library


def qmatmul(x: torch.Tensor, qweight: torch.Tensor, type_name: str) -> torch.Tensor:
    """``x @ Wᵀ`` (float32 ``[rows, in]`` -> ``[rows, out]``) with W as ``type_name`` blocks, by the block
    kernels; raises :class:`BadRequestError` for what they do not take (see :data:`NATIVE_TYPES`)."""
    library = native_qmatmul()
    if library is None:
        raise BadRequestError("the GGUF block kernels are not available here (no C compiler, or "
                              "engine.native_kernels = false)")
    if type_name not in NATIVE_TYPES:
        raise BadRequestError(f"the block kernels take {', '.join(NATIVE_TYPES)}, not {type_name}")
    if x.dtype != torch.float32 or not x.is_cpu or x.dim() != 2 or qweight.dtype != torch.uint8:
        raise BadRequestError(f"qmatmul takes float32 CPU rows [rows, in] and uint8 blocks; got x {x.dtype} "
                              f"{list(x.shape)} on {x.device}, weight {qweight.dtype}")
    values = x.shape[1]
    if qweight.shape[1] != packed_row_bytes(type_name, values):
        raise BadRequestError(f"{type_name} weight rows of {qweight.shape[1]} bytes do not hold {values} values")
    if library.enigma_activation_row_bytes(NATIVE_TYPES[type_name], values) == 0:
        raise BadRequestError(f"the block kernels cannot multiply {type_name} rows of {values} values")
    return _qmatmul(library, NATIVE_TYPES[type_name], x.contiguous(), qweight)


def _qmatmul(library: Any, kind: int, x: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """:func:`qmatmul` without the checks, for callers that made them once (a module's shapes are fixed)."""
    rows, values = x.shape
    scratch = torch.empty(rows * library.enigma_activation_row_bytes(kind, values), dtype=torch.uint8)
    y = torch.empty(rows, qweight.shape[0], dtype=torch.float32)
    library.enigma_qmatmul(kind, qweight.data_ptr(), qweight.shape[0], values, x.data_ptr(), rows,
                           scratch.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return y


def packed_values(qweight: torch.Tensor, type_name: str, in_features: int) -> torch.Tensor:
    """A packed weight ``[out, row_bytes]`` as float32 ``[out, in_features]`` (natively where it can)."""
    library = native_qmatmul() if qweight.is_cpu and type_name in DEQUANTIZED_TYPES else None
    if library is None:
        return dequantize_blocks(qweight, type_name)
    values = torch.empty(qweight.shape[0], in_features, dtype=torch.float32)
    library.enigma_dequantize(NATIVE_TYPES[type_name], qweight.data_ptr(), qweight.shape[0], in_features,
                              values.data_ptr(), torch.get_num_threads())
    return values


def packed_linear(x: torch.Tensor, qweight: torch.Tensor, type_name: str, in_features: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x Wᵀ + b`` for W packed as ``type_name``: the block kernels for up to :data:`NATIVE_MAX_ROWS` rows on
    the CPU (inference), else the dequantized weight through ``F.linear``."""
    rows = x.numel() // in_features if in_features else 0
    kind = NATIVE_TYPES.get(type_name)
    library = native_qmatmul()
    if (kind is not None and library is not None and 0 < rows <= NATIVE_MAX_ROWS and x.is_cpu
            and not torch.is_grad_enabled() and in_features % (256 if kind >= 12 else 32) == 0):
        y = _qmatmul(library, kind, x.reshape(rows, in_features).float().contiguous(), qweight)
        if bias is not None:
            y += bias.float()
        return y.reshape(*x.shape[:-1], qweight.shape[0]).to(x.dtype)
    if (type_name in DEQUANTIZED_TYPES and library is not None and x.is_cpu and x.dtype == torch.float32
            and not torch.is_grad_enabled()):
        y = _chunked_linear(library, NATIVE_TYPES[type_name], x.reshape(rows, in_features), qweight)
        if bias is not None:
            y += bias
        return y.reshape(*x.shape[:-1], qweight.shape[0])
    return F.linear(x, packed_values(qweight, type_name, in_features).to(x.dtype),
                    None if bias is None else bias.to(x.dtype))


CHUNK_BYTES = 4 << 20
"""Many rows (prefill, batched decode): the weight is dequantized this many bytes of floats at a time into a
reused buffer, each piece multiplied as it is made — no full float copy of the weight is ever allocated
(page faults on fresh memory cost a fifth of a batch-32 step), and the piece is still in cache for the GEMM."""
_scratch = threading.local()


def _chunked_linear(library: Any, kind: int, x: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """``x @ Wᵀ`` for many rows: W dequantized a chunk of output features at a time."""
    out, values = qweight.shape[0], x.shape[1]
    step = max(16, CHUNK_BYTES // (4 * values))
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < step * values:
        buffer = _scratch.buffer = torch.empty(step * values, dtype=torch.float32)
    x_t = x.t()
    y_t = torch.empty(out, x.shape[0], dtype=torch.float32)
    threads = torch.get_num_threads()
    for start in range(0, out, step):
        rows = min(step, out - start)
        piece = buffer[:rows * values].view(rows, values)
        library.enigma_dequantize(kind, qweight[start].data_ptr(), rows, values, piece.data_ptr(), threads)
        torch.mm(piece, x_t, out=y_t[start:start + rows])
    return y_t.t()


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
        return packed_values(self.qweight, self.type_name, self.in_features).to(dtype)

    @classmethod
    def fuse(cls, parts: list[GGMLLinear]) -> GGMLLinear | None:
        """One module for projections that read the same input (q/k/v, gate/up) when they share a type: their
        bytes concatenated, each part's ``qweight`` (and bias) a view of the whole; None otherwise."""
        first = parts[0]
        if any(p.type_name != first.type_name or p.in_features != first.in_features
               or (p.bias is None) != (first.bias is None) or p.qweight.device != first.qweight.device
               for p in parts):
            return None
        fused = cls(first.in_features, sum(p.out_features for p in parts), first.type_name,
                    bias=first.bias is not None, device="meta")
        fused.qweight = torch.cat([p.qweight for p in parts])
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
        start = 0
        for part in parts:
            rows = slice(start, start + part.out_features)
            part.qweight = fused.qweight[rows]
            if part.bias is not None:
                part.bias.data = fused.bias.data[rows]
            start += part.out_features
        return fused

    def native_projection(self) -> Any:
        """This Linear in the core's native decoder (``enigma.native.decoder``): the block kernels up to
        :data:`NATIVE_MAX_ROWS` rows; None for a type they do not take, off the CPU, or without them."""
        library = native_qmatmul()
        kind = NATIVE_TYPES.get(self.type_name)
        if library is None or kind is None or not self.qweight.is_cpu or not self.qweight.is_contiguous():
            return None
        scratch = library.enigma_activation_row_bytes(kind, self.in_features)
        if scratch == 0 or (self.bias is not None and self.bias.dtype != torch.float32):
            return None
        import ctypes

        from enigma.native.decoder import NativeProjection

        return NativeProjection(function=ctypes.cast(library.enigma_qmatmul, ctypes.c_void_p).value,
                                weight=self.qweight, in_features=self.in_features, out_features=self.out_features,
                                bias=None if self.bias is None else self.bias.detach(), kind=kind,
                                scratch_bytes_per_row=scratch, max_rows=NATIVE_MAX_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.qweight, self.type_name, self.in_features, self.bias)

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
        return packed_linear(x, self.embedding.qweight, self.embedding.type_name, self.in_features)

    def extra_repr(self) -> str:
        return f"tied to the embedding, {self.embedding.type_name}"
