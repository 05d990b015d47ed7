"""GPTQ with activation order and EXL2's mixed-bit groups, as exllamav2's AdaptiveGPTQ does it.

A Linear's inputs are sorted by their Hessian diagonal (the most salient
first, "act-order"), its rows quantized in that order one at a time, and each
row's rounding error spread over the rows not yet quantized through the
inverse Hessian's Cholesky factor, so that the layer's *output* on the
calibration inputs stays close. Each group of rows picks its scales as
exllamav2's AdaptiveQuantizer does: per column a 4-bit code of the
square root of its range relative to the group's largest, then one factor
for the whole group searched on a grid for the least ``|error|^3.5``.

:func:`quantize_linear` returns the stored values, scale codes and maxima —
what :mod:`enigma_exl2.layout` packs — and the float weight they stand for,
computed exactly as :func:`enigma_exl2.layout.reference_dequantize` computes it
from the packed tensors. :func:`round_to_nearest` is the same without error
feedback (the baseline GPTQ must beat).
"""

from __future__ import annotations

import attrs
import numpy as np
import torch

from enigma.errors import BadRequestError
from enigma_exl2.layout import COLUMN_ALIGN, pack_columns, pack_scales, qzero
from enigma_exl2.qparams import QParams

DAMPING = 0.12
"""Diagonal damping of the Hessian, as a fraction of its mean (exllamav2's percdamp)."""
P_MIN, P_MAX, P_GRID = 0.70, 1.20, 96


class Hessian:
    """``Σ xᵀx`` over the inputs a Linear saw (GPTQ's ``H``, up to scale)."""

    def __init__(self, features: int) -> None:
        self.sum = torch.zeros(features, features, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.sum.addmm_(rows.T, rows)
        self.count += rows.shape[0]

    def matrix(self) -> torch.Tensor:
        if self.count == 0:
            raise BadRequestError("no calibration inputs reached this Linear")
        return (self.sum / self.count).float()


@attrs.frozen
class Prepared:
    """A Hessian ready for GPTQ: the act-order permutation and the upper Cholesky factor of its inverse."""

    perm: torch.Tensor
    inverse_factor: torch.Tensor


def prepare(hessian: torch.Tensor) -> Prepared:
    """Sort inputs by salience, damp the Hessian and factor its inverse (more damping while it will not)."""
    diagonal = torch.diagonal(hessian)
    perm = torch.argsort(diagonal, descending=True, stable=True)
    h = hessian[perm][:, perm].double()
    damp = max(DAMPING * float(diagonal.mean()), 1e-5)
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for _ in range(10):
        try:
            lower = torch.linalg.cholesky(h + damp * eye)
            factor = torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
            if torch.isfinite(factor).all():
                return Prepared(perm, factor.float())
        except torch.linalg.LinAlgError:
            pass
        damp *= 10
    raise BadRequestError("the calibration Hessian is not invertible even with heavy damping; give longer or "
                          "more varied calibration text")


@attrs.frozen
class GroupScales:
    codes: torch.Tensor
    """Per column, 1..16."""
    scale: torch.Tensor
    """Per column, float32: ``code² · scale_max / 256`` with scale_max in float16."""
    scale_max: torch.Tensor
    """float16 scalar."""


def find_scales(rows: torch.Tensor, bits: int) -> GroupScales:
    """A group's scales for ``rows`` ``[n, columns]`` at ``bits`` bits."""
    maxq = (1 << bits) - 1
    zero = qzero(bits)
    base = (rows.abs().amax(dim=0) + 1e-12) / (maxq / 2)
    group_max = base.max()
    codes = torch.clamp(torch.round(torch.sqrt(base / group_max) * 16), 1, 16)
    trial = (codes / 16) ** 2 * group_max
    grid = torch.arange(P_GRID + 1, dtype=torch.float32) / P_GRID
    factors = P_MIN * (1 - grid) + P_MAX * grid
    errors = torch.empty(P_GRID + 1)
    for index, factor in enumerate(factors.tolist()):   # one factor at a time: stays in cache
        scale = trial * factor
        error = torch.clamp(torch.round(rows / scale), -zero, maxq - zero).mul_(scale).sub_(rows).abs_()
        errors[index] = (error.square() * error * error.sqrt()).sum()   # |e| ** 3.5
    best = factors[int(torch.argmin(errors))]
    scale_max = (group_max * best).to(torch.float16)
    scale = codes ** 2 * (scale_max.float() / 256)
    return GroupScales(codes.to(torch.int64), scale, scale_max)


@attrs.frozen
class QuantizedLinear:
    """One Linear in EXL2's terms, before packing, and the float weight it stands for."""

    values: torch.Tensor
    """Stored values ``[in, out]`` (0..2^bits-1) in stored (permuted) row order."""
    codes: torch.Tensor
    """Scale codes ``[groups, out]``."""
    scale_max: torch.Tensor
    """float16 ``[groups]``."""
    groups: tuple[tuple[int, int], ...]
    """``(bits, rows)`` per group."""
    perm: torch.Tensor
    weight: torch.Tensor
    """The dequantized weight ``[out, in]`` float32 (what the kernels multiply by)."""

    def tensors(self, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The Linear's EXL2 tensors (``q_weight``, ``q_scale``, ... and ``bias``), columns padded to 32."""
        out_features = self.values.shape[1]
        padding = -out_features % COLUMN_ALIGN
        values = self.values.numpy()
        codes = self.codes.numpy()
        if padding:
            values = np.pad(values, ((0, 0), (0, padding)))
            codes = np.pad(codes, ((0, 0), (0, padding)), constant_values=1)
        words, table, row = [], [], 0
        for (bits, rows) in self.groups:
            table += [bits, sum(w.shape[0] for w in words)]
            chunk = values[row:row + rows].copy()
            if padding:
                chunk[:, out_features:] = qzero(bits)
            words.append(pack_columns(chunk, bits))
            row += rows
        tensors = {
            "q_weight": torch.from_numpy(np.concatenate(words)),
            "q_scale": torch.from_numpy(pack_scales(codes)),
            "q_scale_max": self.scale_max.clone(),
            "q_groups": torch.tensor(table, dtype=torch.int16),
            "q_invperm": torch.argsort(self.perm).to(torch.int32),
        }
        if bias is not None:
            tensors["bias"] = bias.detach().to(torch.float16)
        return tensors


def quantize_linear(weight: torch.Tensor, prepared: Prepared, qparams: QParams) -> QuantizedLinear:
    """GPTQ of ``weight`` ``[out, in]`` with ``qparams``' groups."""
    return _quantize(weight, prepared.perm, prepared.inverse_factor, qparams)


def round_to_nearest(weight: torch.Tensor, qparams: QParams, perm: torch.Tensor | None = None) -> QuantizedLinear:
    """The same groups and scales, each value rounded on its own (no error feedback)."""
    perm = torch.arange(weight.shape[1]) if perm is None else perm
    return _quantize(weight, perm, None, qparams)


def _quantize(weight: torch.Tensor, perm: torch.Tensor, factor: torch.Tensor | None,
              qparams: QParams) -> QuantizedLinear:
    out_features, in_features = weight.shape
    w = weight.detach().float().T[perm].clone()                 # [in, out], salient rows first
    values = torch.empty(in_features, out_features, dtype=torch.int64)
    dequantized = torch.empty_like(w)
    groups = tuple(qparams.groups(in_features))
    codes, maxima = [], []
    start = 0
    for bits, rows in groups:
        end = start + rows
        scales = find_scales(w[start:end], bits)
        codes.append(scales.codes)
        maxima.append(scales.scale_max)
        zero, maxq = qzero(bits), (1 << bits) - 1
        errors = torch.empty(rows, out_features) if factor is not None else None
        for row in range(start, end):
            q = torch.clamp(torch.round(w[row] / scales.scale) + zero, 0, maxq)
            values[row] = q.to(torch.int64)
            dequantized[row] = (q - zero) * scales.scale
            if factor is not None:
                error = (w[row] - dequantized[row]) / factor[row, row]
                errors[row - start] = error
                if row + 1 < end:
                    w[row + 1:end] -= factor[row, row + 1:end, None] * error[None, :]
        if factor is not None and end < in_features:
            w[end:] -= factor[start:end, end:].T @ errors
        start = end
    return QuantizedLinear(values=values, codes=torch.stack(codes), scale_max=torch.stack(maxima),
                           groups=groups, perm=perm.clone(),
                           weight=dequantized[torch.argsort(perm)].T.contiguous())
