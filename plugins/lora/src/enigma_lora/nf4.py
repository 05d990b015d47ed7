"""4-bit NormalFloat (NF4) with double quantization: QLoRA's frozen base, in bitsandbytes' layout, pure torch.

A weight is cut into blocks of 64 values; each block is scaled by its
absolute maximum and every value replaced by the nearest of the 16 NF4 codes
(quantiles of a normal distribution, Dettmers et al. 2023), two codes to a
byte, the first in the high nibble. Double quantization stores the per-block
maxima in 8 bits too: their mean is subtracted and they are quantized in
blocks of 256 against bitsandbytes' signed dynamic 8-bit map, with one
float32 maximum per 256 blocks. About 4.13 bits per weight in all.

The 4-bit codes equal bitsandbytes' bit for bit. The maxima's 8-bit codes are
the nearest ones, as bitsandbytes' torch backend picks them; its CPU kernel's
approximate binary search takes the neighbouring code for about 0.2 % of
them (tests/plugins/lora/test_qlora.py measures it).
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
"""bitsandbytes' NF4 table."""
BLOCK = 64
STATS_BLOCK = 256


def dynamic_map(*, signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit quantization map (``create_dynamic_map``): 256 sorted values in [-1, 1]
    spaced by decades, dense near zero."""
    data: list[float] = []
    non_sign_bits = total_bits - (1 if signed else 0)
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        count = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else \
            2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        boundaries = torch.linspace(0.1, 1, count)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def _nearest(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The index of the nearest code of each value (``code`` sorted), by midpoints."""
    midpoints = (code[1:] + code[:-1]) / 2
    return torch.bucketize(values, midpoints, right=False).to(torch.uint8)


@attrs.frozen
class NF4Weight:
    """A quantized weight: packed codes, its block maxima (8-bit with their own maxima, or float32), shape."""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: float | None = None
    """With double quantization: the mean subtracted from the maxima."""
    stats_absmax: torch.Tensor | None = None
    """With double quantization: one float32 maximum per 256 blocks."""

    @property
    def nbytes(self) -> int:
        extra = 0 if self.stats_absmax is None else self.stats_absmax.numel() * 4
        return self.packed.numel() + self.absmax.numel() * self.absmax.element_size() + extra


def quantize_nf4(weight: torch.Tensor, *, double_quant: bool = True) -> NF4Weight:
    """``weight`` in NF4; a last block shorter than 64 is scaled by its own maximum."""
    flat = weight.detach().reshape(-1).float()
    padding = -flat.numel() % BLOCK
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    blocks = flat.view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / torch.where(absmax > 0, absmax, 1)[:, None]
    codes = _nearest(scaled.reshape(-1), torch.tensor(NF4_CODE))[:weight.numel()]
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    packed = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return NF4Weight(packed, absmax, tuple(weight.shape), weight.dtype)
    offset = absmax.mean().item()
    centred = absmax - offset
    stats_padding = -centred.numel() % STATS_BLOCK
    padded = torch.cat([centred, centred.new_zeros(stats_padding)]) if stats_padding else centred
    stats_blocks = padded.view(-1, STATS_BLOCK)
    stats_absmax = stats_blocks.abs().amax(dim=1)
    normalized = stats_blocks / torch.where(stats_absmax > 0, stats_absmax, 1)[:, None]
    absmax_codes = _nearest(normalized.reshape(-1), dynamic_map())[:centred.numel()]
    return NF4Weight(packed, absmax_codes, tuple(weight.shape), weight.dtype, offset, stats_absmax)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight back, in ``dtype`` (default: the original's)."""
    if q.stats_absmax is None:
        absmax = q.absmax.float()
    else:
        stats = torch.repeat_interleave(q.stats_absmax, STATS_BLOCK)[:q.absmax.numel()]
        absmax = dynamic_map()[q.absmax.long()] * stats + q.offset
    count = 1
    for size in q.shape:
        count *= size
    codes = torch.stack([q.packed >> 4, q.packed & 0x0F], dim=1).reshape(-1)[:count].long()
    codes = torch.cat([codes, codes.new_full((-count % BLOCK,), 7)])  # code 7 is 0.0
    values = torch.tensor(NF4_CODE)[codes].view(-1, BLOCK) * absmax[:, None]
    return values.reshape(-1)[:count].view(q.shape).to(dtype or q.dtype)


class NF4Linear(nn.Module):
    """A frozen Linear held in NF4: its weight dequantized to the input's dtype for each matmul."""

    def __init__(self, linear: nn.Linear, *, double_quant: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q = quantize_nf4(linear.weight, double_quant=double_quant)
        self.register_buffer("weight_packed", q.packed)
        self.register_buffer("weight_absmax", q.absmax)
        self.register_buffer("weight_stats_absmax", q.stats_absmax)
        self.offset, self.weight_dtype, self.weight_shape = q.offset, q.dtype, q.shape
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def quantized(self) -> NF4Weight:
        return NF4Weight(self.weight_packed, self.weight_absmax, self.weight_shape, self.weight_dtype, self.offset,
                         self.weight_stats_absmax)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self.quantized(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


def quantize_linears(model: nn.Module, *, skip: tuple[str, ...] = ("lm_head",), double_quant: bool = True) -> int:
    """Replace every ``nn.Linear`` of ``model`` (but ``skip``) by an :class:`NF4Linear`, one at a time so only
    one float weight is extra at any moment; returns how many."""
    names = [name for name, module in model.named_modules()
             if type(module) is nn.Linear and name.split(".")[-1] not in skip]
    for name in names:
        parent, _, attribute = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attribute, NF4Linear(getattr(owner, attribute), double_quant=double_quant))
    return len(names)
