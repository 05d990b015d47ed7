"""ggml's block formats: quantize float32 rows into a type's bytes, and back.

Q4_K, Q5_K and Q6_K (super-blocks of 256 values) are quantized by
``kquants.c``, compiled for this machine on first use and cached: the same
search and float32 arithmetic as llama.cpp's ``quantize_row_q*_K_ref`` (no
importance matrix), so the bytes are llama.cpp's (the tests compare them with
libggml's own). Q8_0, F16 and F32 go through the ``gguf`` package, whose Q8_0
is already llama.cpp's bytes, and dequantizing any type is ``gguf.quants``'.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from enigma.errors import BadRequestError, NotAvailableError

BLOCKS = {"F32": (1, 4), "F16": (1, 2), "Q8_0": (32, 34), "Q5_0": (32, 22), "Q5_1": (32, 24),
          "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
"""Each type's (values per block, bytes per block), as ggml lays them out."""
K_BITS = {"Q4_K": 4, "Q5_K": 5, "Q6_K": 6}
FLOATS = {"F32": np.float32, "F16": np.float16}

_library: dict[str, Any] = {}


def row_bytes(type_name: str, n: int) -> int:
    """Bytes of one row of ``n`` values in ``type_name``."""
    values, size = _block(type_name)
    if n % values:
        raise BadRequestError(f"{type_name} packs rows in blocks of {values} values; a row of {n} does not divide")
    return n // values * size


def quantize(rows: np.ndarray, type_name: str) -> np.ndarray:
    """``rows`` (float32, ``[..., n]``) as ``type_name``'s bytes: uint8 ``[..., row_bytes]``."""
    _block(type_name)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n = rows.shape[-1]
    out_shape = (*rows.shape[:-1], row_bytes(type_name, n))
    if type_name in K_BITS:
        out = np.empty(out_shape, dtype=np.uint8)
        count = rows.size // n if n else 0
        if _kquants().enigma_quantize_k(rows.ctypes.data, out.ctypes.data, count, n, K_BITS[type_name]) != 0:
            raise BadRequestError(f"{type_name} cannot quantize rows of {n} values")
        return out
    if type_name in FLOATS:
        return rows.astype(FLOATS[type_name]).view(np.uint8).reshape(out_shape)
    from gguf import GGMLQuantizationType, quants

    return quants.quantize(rows, GGMLQuantizationType[type_name]).reshape(out_shape)


def dequantize(data: np.ndarray, type_name: str) -> np.ndarray:
    """``type_name``'s bytes (uint8 ``[..., row_bytes]``) back to float32 ``[..., n]``."""
    _block(type_name)
    if type_name in FLOATS:
        return np.ascontiguousarray(data).view(FLOATS[type_name]).astype(np.float32)
    from gguf import GGMLQuantizationType, quants

    return quants.dequantize(data, GGMLQuantizationType[type_name])


def _block(type_name: str) -> tuple[int, int]:
    if type_name not in BLOCKS:
        raise BadRequestError(f"unknown ggml type {type_name!r}; known: {', '.join(BLOCKS)}")
    return BLOCKS[type_name]


def _kquants() -> Any:
    if "kquants" not in _library:
        from enigma.native import NativeBuildError, build
        from enigma.paths import get_paths

        try:
            path = build(get_paths().cache_dir / "native", package=__package__, source_name="kquants.c",
                         name="enigma-ggml-kquants", flags=("-ffp-contract=off",),
                         headers=("ggml_common.h",))
        except NativeBuildError as error:
            raise NotAvailableError(f"the k-quant quantizers need a C compiler here: {error}") from error
        library = ctypes.CDLL(str(path))
        library.enigma_quantize_k.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                              ctypes.c_int]
        library.enigma_quantize_k.restype = ctypes.c_int
        _library["kquants"] = library
    return _library["kquants"]
