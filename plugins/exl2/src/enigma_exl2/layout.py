"""EXL2's tensors, read from the format: bit packing, scale codes, groups, and a reference dequantizer.

A Linear of ``in`` inputs and ``out`` outputs is stored transposed (rows are
inputs, as GPTQ handles them), its rows reordered by ``perm`` (the most
salient inputs first). Rows come in groups; each group has its own bit width
and, per output column, a 4-bit scale code. Per Linear, under its module name:

- ``q_weight`` int32 ``[Σ qrows, out']``: each group's values packed down the
  columns, LSB first, as one bit stream per column (16/8/4 values per word at
  2/4/8 bits; 32 values in 3 or 5 words at 3 or 5 bits; 16 in 3 words at 6);
  stored value = signed value + 2^(bits-1). ``out'`` is ``out`` padded to a
  multiple of 32.
- ``q_scale`` int32 ``[groups, out'/8]``: scale codes 1..16, stored minus one,
  eight per word (nibble i at bits 4i).
- ``q_scale_max`` float16 ``[groups]``; the scale of column c in group g is
  ``code² · q_scale_max[g] / 256``.
- ``q_groups`` int16 ``[2 · groups]``: (bits, first ``q_weight`` row) pairs.
- ``q_invperm`` int32 ``[in]``: ``perm = argsort(q_invperm)``; stored row r
  holds input ``perm[r]``.
- ``bias`` float16 ``[out]`` where the Linear has one.

:func:`reference_dequantize` turns these back into the float weight with
numpy alone (the oracle of the kernels, and of the quantizer's own floats).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np

from enigma.errors import BadRequestError

BIT_WIDTHS = (2, 3, 4, 5, 6, 8)
"""The widths exllamav2's kernels read."""
SCALE_BITS = 4
COLUMN_ALIGN = 32
"""Output columns are padded to a multiple of this (exllamav2 pads q_weight and q_scale so)."""
TENSOR_SUFFIXES = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")


def qzero(bits: int) -> int:
    """The stored value of a zero: ``2^(bits-1)``."""
    return 1 << (bits - 1)


def packed_rows(rows: int, bits: int) -> int:
    """int32 rows that ``rows`` values of ``bits`` bits take (the last group's stream is padded to a word)."""
    return -(-rows * bits // 32)


def pack_columns(values: np.ndarray, bits: int) -> np.ndarray:
    """Stored values ``[rows, columns]`` (0..2^bits-1) as int32 ``[packed_rows, columns]``: per column one
    LSB-first bit stream."""
    if bits not in BIT_WIDTHS:
        raise BadRequestError(f"EXL2 packs {', '.join(map(str, BIT_WIDTHS))}-bit values, not {bits}-bit")
    values = np.asarray(values, dtype=np.uint64)
    if values.size and int(values.max()) >= 1 << bits:
        raise BadRequestError(f"a value of {int(values.max())} does not fit {bits} bits")
    rows, columns = values.shape
    words = np.zeros((packed_rows(rows, bits) + 1, columns), dtype=np.uint64)  # one spare for straddling
    for row in range(rows):
        word, shift = divmod(row * bits, 32)
        shifted = values[row] << np.uint64(shift)
        words[word] |= shifted & np.uint64(0xFFFFFFFF)
        words[word + 1] |= shifted >> np.uint64(32)
    return words[:-1].astype(np.uint32).view(np.int32)


def unpack_columns(packed: np.ndarray, bits: int, rows: int) -> np.ndarray:
    """The inverse of :func:`pack_columns`: int32 ``[packed_rows, columns]`` -> stored values ``[rows, columns]``."""
    words = np.asarray(packed).view(np.uint32).astype(np.uint64)
    words = np.concatenate([words, np.zeros((1, words.shape[1]), dtype=np.uint64)])
    mask = np.uint64((1 << bits) - 1)
    out = np.empty((rows, words.shape[1]), dtype=np.int32)
    for row in range(rows):
        word, shift = divmod(row * bits, 32)
        stream = words[word] | (words[word + 1] << np.uint64(32))
        out[row] = ((stream >> np.uint64(shift)) & mask).astype(np.int32)
    return out


def pack_scales(codes: np.ndarray) -> np.ndarray:
    """Scale codes ``[groups, columns]`` (1..16, columns a multiple of 8) as int32 ``[groups, columns/8]``."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.shape[1] % 8:
        raise BadRequestError(f"scale codes come eight to a word; {codes.shape[1]} columns do not divide")
    if codes.size and (codes.min() < 1 or codes.max() > 16):
        raise BadRequestError("EXL2 scale codes lie in 1..16")
    nibbles = (codes - 1).reshape(codes.shape[0], -1, 8)
    words = np.zeros(nibbles.shape[:2], dtype=np.uint64)
    for i in range(8):
        words |= nibbles[..., i].astype(np.uint64) << np.uint64(4 * i)
    return words.astype(np.uint32).view(np.int32)


def unpack_scales(packed: np.ndarray) -> np.ndarray:
    """int32 ``[groups, words]`` -> scale codes ``[groups, 8 · words]`` (1..16)."""
    words = np.asarray(packed).view(np.uint32).astype(np.int64)
    nibbles = [(words >> (4 * i)) & 0xF for i in range(8)]
    return (np.stack(nibbles, axis=-1) + 1).reshape(words.shape[0], -1)


@attrs.frozen
class Group:
    """One group of rows: its width, its rows (in stored order) and where its words start."""

    bits: int
    first_row: int
    rows: int
    first_qrow: int

    @property
    def qrows(self) -> int:
        return packed_rows(self.rows, self.bits)


def read_groups(q_groups: np.ndarray, qrows: int, in_features: int) -> list[Group]:
    """The groups a ``q_groups`` table describes (rows per group follow from the words between starts, as
    exllamav2's group map does; the last group ends at ``in_features``)."""
    pairs = np.asarray(q_groups, dtype=np.int64).reshape(-1, 2)
    groups, row = [], 0
    for index, (bits, start) in enumerate(pairs.tolist()):
        if bits not in BIT_WIDTHS:
            raise BadRequestError(f"q_groups names a {bits}-bit group; EXL2 has {BIT_WIDTHS}")
        end = pairs[index + 1, 1] if index + 1 < len(pairs) else qrows
        rows = min((end - start) * 32 // bits, in_features - row)
        if rows <= 0 or start != (groups[-1].first_qrow + groups[-1].qrows if groups else 0):
            raise BadRequestError("q_groups does not describe consecutive groups of the weight's rows")
        groups.append(Group(bits, row, rows, start))
        row += rows
    if row != in_features:
        raise BadRequestError(f"q_groups covers {row} rows of a Linear with {in_features} inputs")
    return groups


def group_scales(codes: np.ndarray, scale_max: np.ndarray) -> np.ndarray:
    """Scales ``[groups, columns]`` float32: ``code² · scale_max / 256``, with scale_max first rounded to float16
    as stored."""
    scale_max = np.asarray(scale_max, dtype=np.float16).astype(np.float32) / np.float32(256)
    return (codes.astype(np.float32) ** 2) * scale_max[:, None]


def reference_dequantize(tensors: Mapping[str, Any], in_features: int, out_features: int) -> np.ndarray:
    """The float32 weight ``[out, in]`` (nn.Linear's layout) of one Linear's EXL2 tensors (numpy arrays, or
    anything ``np.asarray`` takes)."""
    q_weight = np.asarray(tensors["q_weight"])
    groups = read_groups(np.asarray(tensors["q_groups"]), q_weight.shape[0], in_features)
    scales = group_scales(unpack_scales(np.asarray(tensors["q_scale"])),
                          np.asarray(tensors["q_scale_max"]))
    stored = np.empty((in_features, q_weight.shape[1]), dtype=np.float32)
    for index, group in enumerate(groups):
        values = unpack_columns(q_weight[group.first_qrow:group.first_qrow + group.qrows], group.bits, group.rows)
        stored[group.first_row:group.first_row + group.rows] = (
            (values - qzero(group.bits)).astype(np.float32) * scales[index])
    invperm = np.asarray(tensors["q_invperm"], dtype=np.int64)
    return stored[invperm, :out_features].T.copy()  # original input i sits at stored row invperm[i]
