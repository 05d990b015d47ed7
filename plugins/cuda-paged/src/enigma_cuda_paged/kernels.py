"""Paged attention in Triton: one kernel for prefills, decodes and drafts being verified, KV read in place.

The cache layout is the torch backend's (``[2, kv_heads, num_blocks,
block_size, head_dim]`` per layer), so the kernel walks each sequence's block
table and loads one cache block per iteration — no gather, no copy.

A program computes one *tile*: up to ``BLOCK_Q`` consecutive new tokens of one
sequence, for all the query heads that share one KV head (GQA). Its rows are
(token, head in group) pairs, ``BLOCK_M = BLOCK_Q * group`` of them padded to a
power of two of at least 16 (``tl.dot``'s smallest), so a decode of a model
with 8 query heads per KV head fills 8 rows with one load of each key. Scores
are masked causally (and by the sliding window), softmax runs online (flash
attention's running max and sum), accumulation is float32 whatever the cache's
dtype.

What a step needs beyond the metadata every backend gets — where each
sequence's new tokens start in the flat batch, and which tile belongs to which
sequence — is built once per step by :func:`step_tables` and shared by every
layer. On a CPU the kernel runs under ``TRITON_INTERPRET=1``: that is how the
tests check it where no GPU is.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
import triton
import triton.language as tl

from enigma_cuda_paged import interpreted

MIN_DOT = 16
"""``tl.dot``'s smallest dimension: tiles, cache blocks and head dims are padded (or must be) at least this."""


@triton.jit
def _paged_attention_kernel(
    q_ptr, kv_ptr, out_ptr, tables_ptr, seq_lens_ptr, q_starts_ptr, tile_seq_ptr, tile_first_ptr,
    scale, window,
    q_stride_token, q_stride_head, out_stride_token, out_stride_head,
    kv_stride_part, kv_stride_head, kv_stride_block, table_stride,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, SLIDING: tl.constexpr, PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)
    seq = tl.load(tile_seq_ptr + tile)
    first = tl.load(tile_first_ptr + tile)                 # the tile's first token within its sequence's chunk
    q_begin = tl.load(q_starts_ptr + seq)
    q_len = tl.load(q_starts_ptr + seq + 1) - q_begin
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len                              # tokens cached before this step's

    rows = tl.arange(0, BLOCK_M)
    token = first + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (token < q_len)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_ok = dims < HEAD_DIM
    q_offsets = (q_begin + token).to(tl.int64)[:, None] * q_stride_token + head[:, None] * q_stride_head
    q = tl.load(q_ptr + q_offsets + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    position = context + token                             # each row's position in its sequence

    last = tl.minimum(context + first + BLOCK_Q, seq_len)  # the tile sees keys [lowest, last)
    lowest = 0
    if SLIDING:
        lowest = tl.maximum(context + first - window + 1, 0)
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], tl.float32)
    slots = tl.arange(0, BLOCK_SIZE)
    kv_base = kv_ptr + kv_head * kv_stride_head
    for index in range(lowest // BLOCK_SIZE, tl.cdiv(last, BLOCK_SIZE)):
        block = tl.load(tables_ptr + seq * table_stride + index).to(tl.int64)
        offsets = block * kv_stride_block + slots[:, None] * HEAD_DIM + dims[None, :]
        keys = tl.load(kv_base + offsets, mask=dim_ok[None, :], other=0.0)           # [BLOCK_SIZE, dim]
        values = tl.load(kv_base + kv_stride_part + offsets, mask=dim_ok[None, :], other=0.0)
        if DOT_FP32:
            keys, values = keys.to(tl.float32), values.to(tl.float32)
        scores = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * scale         # [BLOCK_M, BLOCK_SIZE]
        key_position = index * BLOCK_SIZE + slots
        visible = key_position[None, :] <= position[:, None]
        if SLIDING:
            visible = visible & (key_position[None, :] > position[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)   # rows that have seen nothing yet
        correction = tl.exp(running_max - safe_max)
        probs = tl.exp(scores - safe_max[:, None])
        running_sum = running_sum * correction + tl.sum(probs, 1)
        acc = acc * correction[:, None] + tl.dot(probs.to(values.dtype), values, input_precision=PRECISION)
        running_max = new_max
    out = acc / tl.where(running_sum == 0.0, 1.0, running_sum)[:, None]
    out_offsets = (q_begin + token).to(tl.int64)[:, None] * out_stride_token + head[:, None] * out_stride_head
    tl.store(out_ptr + out_offsets + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


@attrs.frozen
class StepTables:
    """A step's tables for the kernel, on the device: made once, read by every layer."""

    q_starts: torch.Tensor
    """int32 ``[seqs + 1]``: where each sequence's new tokens start in the flat batch (and the end)."""
    seq_lens: torch.Tensor
    """int32 ``[seqs]``: each sequence's length, cached tokens and new."""
    tile_seq: torch.Tensor
    """int32 ``[tiles]``: the sequence each tile belongs to."""
    tile_first: torch.Tensor
    """int32 ``[tiles]``: the tile's first token within its sequence's new tokens."""
    block_q: int
    """Tokens a tile holds."""


def tile_tokens(group: int, max_query_len: int) -> int:
    """Tokens per tile: enough (token, head) rows for the step's longest chunk, at most 64 rows, at least 16
    (``tl.dot``'s smallest) and at least one token's heads."""
    rows = min(64, triton.next_power_of_2(max_query_len * group))
    return max(rows, MIN_DOT, triton.next_power_of_2(group)) // group


def step_tables(query_lens: Sequence[int], seq_lens: Sequence[int], *, group: int,
                device: torch.device) -> StepTables:
    """The kernel's tables for one step, uploaded in one copy."""
    block_q = tile_tokens(group, max(query_lens))
    tile_seq: list[int] = []
    tile_first: list[int] = []
    for index, query_len in enumerate(query_lens):
        firsts = range(0, query_len, block_q)
        tile_seq.extend([index] * len(firsts))
        tile_first.extend(firsts)
    q_starts = [0]
    for query_len in query_lens:
        q_starts.append(q_starts[-1] + query_len)
    host = torch.tensor([*q_starts, *seq_lens, *tile_seq, *tile_first], dtype=torch.int32)
    if device.type == "cuda":
        host = host.pin_memory()
    packed = host.to(device, non_blocking=True)
    seqs, tiles = len(query_lens), len(tile_seq)
    parts = torch.split(packed, [seqs + 1, seqs, tiles, tiles])
    return StepTables(q_starts=parts[0], seq_lens=parts[1], tile_seq=parts[2], tile_first=parts[3], block_q=block_q)


def block_size_problem(block_size: int) -> str | None:
    """Why the kernel cannot walk cache blocks of ``block_size`` slots, and what to use instead; None if it can."""
    if block_size < MIN_DOT or block_size & (block_size - 1):
        return (f"backend 'cuda-paged' needs a KV block size that is a power of two of at least {MIN_DOT}, not "
                f"{block_size}; use block_size=16 (--block-size 16)")
    return None


def check_cache(kv_cache: torch.Tensor) -> None:
    """Refuse a cache the kernel cannot walk, saying what to change."""
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"paged attention needs a [2, kv_heads, blocks, block_size, head_dim] cache, not "
                         f"{tuple(kv_cache.shape)}")
    problem = block_size_problem(kv_cache.shape[3])
    if problem:
        raise ValueError(problem)
    if not kv_cache.is_contiguous():
        raise ValueError("paged attention needs a contiguous KV cache")


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, tables: StepTables,
                    *, scale: float, sliding_window: int | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of a step's new tokens over their sequences' paged KV.

    ``query`` is ``[tokens, heads, head_dim]`` (every sequence's new tokens,
    packed), ``kv_cache`` one layer's ``[2, kv_heads, blocks, block_size,
    head_dim]`` with this step's keys and values already written,
    ``block_tables`` ``[seqs, max_blocks]``. Returns ``[tokens, heads,
    head_dim]`` in the query's dtype (into ``out`` if given).
    """
    check_cache(kv_cache)
    _, heads, head_dim = query.shape
    _, kv_heads, _, block_size, cache_dim = kv_cache.shape
    if cache_dim != head_dim or heads % kv_heads:
        raise ValueError(f"paged attention: query {tuple(query.shape)} does not fit a cache of {kv_heads} KV heads "
                         f"of {cache_dim}")
    if query.stride(2) != 1:
        query = query.contiguous()
    if out is None:
        out = torch.empty_like(query)
    group = heads // kv_heads
    block_m = max(MIN_DOT, triton.next_power_of_2(tables.block_q * group))
    grid = (tables.tile_seq.shape[0], kv_heads)
    _paged_attention_kernel[grid](
        query, kv_cache, out, block_tables, tables.seq_lens, tables.q_starts, tables.tile_seq, tables.tile_first,
        scale, sliding_window or 0,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), block_tables.stride(0),
        GROUP=group, BLOCK_Q=tables.block_q, BLOCK_M=block_m, BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=max(MIN_DOT, triton.next_power_of_2(head_dim)),
        SLIDING=sliding_window is not None,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        DOT_FP32=query.dtype == torch.bfloat16 and interpreted(),  # the interpreter's bf16 tl.dot is wrong
    )
    return out
