"""Rotary position embeddings (RoPE), with the scalings Llama-family configs use.

References: Su et al. 2021 (RoFormer); transformers' ``modeling_rope_utils``
for the ``linear`` and ``llama3`` frequency rescalings; ``freq_factors`` is
llama.cpp's form of Llama 3's (a divisor per frequency, GGUF's ``rope_freqs``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from enigma.errors import ConfigError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "freq_factors")


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """``[head_dim // 2]`` float32 inverse frequencies, rescaled per ``scaling``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "freq_factors":  # one divisor per frequency, as GGUF files carry Llama 3's (rope_freqs)
        factors = torch.tensor([float(f) for f in scaling["factors"]], dtype=torch.float32)
        if factors.shape != inv_freq.shape:
            raise ConfigError(f"rope_scaling freq_factors has {factors.numel()} factors; head_dim {head_dim} needs "
                              f"{inv_freq.numel()}")
        return inv_freq / factors
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling["low_freq_factor"])
        high_freq_factor = float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ConfigError(f"config.json rope_scaling type {rope_type!r} is not supported; "
                      f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and the signed ``sin`` (``[-sin, sin]`` over the two halves), each
    ``[num_tokens, 1, head_dim]``, for the given positions: what :func:`apply_rotary` takes."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]   # [tokens, head_dim/2]
    cos = freqs.cos()
    sin = freqs.sin()
    return (torch.cat((cos, cos), dim=-1)[:, None, :].to(dtype),
            torch.cat((-sin, sin), dim=-1)[:, None, :].to(dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[tokens, heads, head_dim]`` (halves layout, as Llama checkpoints use).

    ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``,
    written as ``roll(x) * [-sin, sin]``: the same numbers, in three kernels
    instead of six (each costs ≈ 10 µs in a decode step).
    """
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, dims=-1), signed_sin)
