"""The EXL2 matmul in Triton (CUDA): each tile of the weight unpacked inside the matmul, never stored whole.

``exl2_matmul(xp, module, plan)`` computes ``xp @ W_stored`` for activations
already permuted to the weight's stored row order. Per stored row the kernel
reads its word row, bit shift, width and group from the plan, loads the two
words a value may straddle, and scales it by its group's column scale; then
``tl.dot`` accumulates the tile. On a CPU it runs under ``TRITON_INTERPRET=1``
(that is how the tests check it where no GPU is).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def _exl2_kernel(x_ptr, q_ptr, scale_ptr, word_ptr, shift_ptr, bits_ptr, group_ptr, y_ptr,
                 rows, in_features, out_features, columns,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < in_features
        word = tl.load(word_ptr + offs_k, mask=k_ok, other=0).to(tl.int64)
        shift = tl.load(shift_ptr + offs_k, mask=k_ok, other=0).to(tl.int64)
        bits = tl.load(bits_ptr + offs_k, mask=k_ok, other=1).to(tl.int64)
        group = tl.load(group_ptr + offs_k, mask=k_ok, other=0).to(tl.int64)
        n_ok = offs_n < out_features
        tile_ok = k_ok[:, None] & n_ok[None, :]
        low = tl.load(q_ptr + word[:, None] * columns + offs_n[None, :], mask=tile_ok, other=0).to(tl.int64)
        high = tl.load(q_ptr + (word[:, None] + 1) * columns + offs_n[None, :],
                       mask=tile_ok & ((shift + bits) > 32)[:, None], other=0).to(tl.int64)
        stream = (low & 0xFFFFFFFF) | ((high & 0xFFFFFFFF) << 32)
        values = (stream >> shift[:, None]) & ((1 << bits[:, None]) - 1)
        zero = 1 << (bits[:, None] - 1)
        scale = tl.load(scale_ptr + group[:, None] * columns + offs_n[None, :], mask=tile_ok, other=0.0)
        weight = (values - zero).to(tl.float32) * scale
        x = tl.load(x_ptr + offs_m[:, None] * in_features + offs_k[None, :],
                    mask=(offs_m < rows)[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(x, weight, input_precision="ieee")
    tl.store(y_ptr + offs_m[:, None] * out_features + offs_n[None, :], acc,
             mask=(offs_m < rows)[:, None] & (offs_n < out_features)[None, :])


def exl2_matmul(xp: torch.Tensor, module: Any, plan: Any) -> torch.Tensor:
    """``xp [rows, in] @ W_stored[:, :out]`` float32, ``xp`` in the weight's stored row order."""
    rows = xp.shape[0]
    y = torch.empty(rows, module.out_features, dtype=torch.float32, device=xp.device)
    block_m = 16 if rows <= 16 else 64
    grid = (triton.cdiv(rows, block_m), triton.cdiv(module.out_features, 64))
    _exl2_kernel[grid](xp, module.q_weight, plan.scales(module.q_scale).contiguous(), plan.row_word,
                       plan.row_shift, plan.row_bits, plan.row_group, y, rows, module.in_features,
                       module.out_features, module.q_weight.shape[1], BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=32)
    return y
