"""Paged attention in Triton: one kernel for prefills, decodes and drafts being verified, KV read in place.

The cache layout is the torch backend's (``[2, kv_heads, num_blocks,
block_size, head_dim]`` per layer), so the kernel walks each sequence's block
table — no gather, no copy. It reads keys a *KV tile* at a time (16 to 64
keys), finding each key's block through the table, so any block size works:
small blocks are gathered several to a tile.

A program computes one *tile*: up to ``BLOCK_Q`` consecutive new tokens of one
sequence, for all the query heads that share one KV head (GQA). Its rows are
(token, head in group) pairs, ``BLOCK_M = BLOCK_Q * group`` of them padded to a
power of two of at least 16 (``tl.dot``'s smallest), so a decode of a model
with 8 query heads per KV head fills 8 rows with one load of each key. Scores
are masked causally (and by the sliding window), softmax runs online (flash
attention's running max and sum), accumulation is float32 whatever the cache's
dtype; fp8 caches (e4m3, e5m2) are widened as they are read.

A step of few tiles (a small decode batch) would leave most of the GPU idle
while each program walks a long history, so such steps share each tile's keys
out among ``splits`` programs (flash-decoding) that write unnormalised partial
results with their running max and sum; a second kernel merges them.

What a step needs beyond the metadata every backend gets — where each
sequence's new tokens start in the flat batch, which tile belongs to which
sequence, how many splits — is built once per step by :func:`step_tables` and
shared by every layer. On a CPU the kernels run under ``TRITON_INTERPRET=1``:
that is how the tests check them where no GPU is."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import attrs
import torch
import triton
import triton.language as tl

from enigma.transfer import to_device
from enigma_cuda_paged import interpreted

MIN_DOT = 16
"""``tl.dot``'s smallest dimension: query tiles, KV tiles and head dims are padded to at least this."""
MIN_SPLIT_KEYS = 256
"""The fewest keys worth a program of their own when a step's keys are split (flash-decoding)."""
MAX_SPLITS = 16


@triton.jit
def _paged_attention_kernel(
    q_ptr, kv_ptr, out_ptr, part_acc_ptr, part_stats_ptr, tables_ptr, seq_lens_ptr, q_starts_ptr, tile_seq_ptr,
    tile_first_ptr, scale, window, tokens, heads,
    q_stride_token, q_stride_head, out_stride_token, out_stride_head,
    kv_stride_part, kv_stride_head, kv_stride_block, table_stride,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    KV_TILE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, SLIDING: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, SPLITS: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
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
    begin = lowest // KV_TILE
    end = tl.cdiv(last, KV_TILE)
    if SPLITS > 1:                                         # this program's share of the tile's KV tiles
        share = tl.cdiv(end - begin, SPLITS)
        begin = begin + split * share
        end = tl.minimum(end, begin + share)
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], tl.float32)
    slots = tl.arange(0, KV_TILE)
    kv_base = kv_ptr + kv_head * kv_stride_head
    for index in range(begin, end):
        key_position = index * KV_TILE + slots
        in_sequence = key_position < last
        # each key's cache block from the table: a KV tile may span several small blocks, or part of a big one
        block = tl.load(tables_ptr + seq * table_stride + key_position // BLOCK_SIZE, mask=in_sequence,
                        other=0).to(tl.int64)
        offsets = (block * kv_stride_block + (key_position % BLOCK_SIZE) * HEAD_DIM)[:, None] + dims[None, :]
        load_ok = in_sequence[:, None] & dim_ok[None, :]
        keys = tl.load(kv_base + offsets, mask=load_ok, other=0.0)                     # [KV_TILE, dim]
        values = tl.load(kv_base + kv_stride_part + offsets, mask=load_ok, other=0.0)
        keys, values = keys.to(q.dtype), values.to(q.dtype)                             # fp8 caches widen here
        scores = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * scale          # [BLOCK_M, KV_TILE]
        visible = (key_position[None, :] <= position[:, None]) & in_sequence[None, :]
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
    out_rows = (q_begin + token).to(tl.int64)
    out_ok = row_ok[:, None] & dim_ok[None, :]
    if SPLITS > 1:
        # unnormalised: _combine_splits_kernel merges the splits' [split, token, head] rows by their (max, sum)
        part_row = (split * tokens + out_rows) * heads + head
        tl.store(part_acc_ptr + part_row[:, None] * HEAD_DIM + dims[None, :], acc, mask=out_ok)
        tl.store(part_stats_ptr + part_row * 2, running_max, mask=row_ok)
        tl.store(part_stats_ptr + part_row * 2 + 1, running_sum, mask=row_ok)
    else:
        out = acc / tl.where(running_sum == 0.0, 1.0, running_sum)[:, None]
        out_offsets = out_rows[:, None] * out_stride_token + head[:, None] * out_stride_head
        tl.store(out_ptr + out_offsets + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _combine_splits_kernel(part_acc_ptr, part_stats_ptr, out_ptr, tokens, heads, out_stride_token,
                           out_stride_head, SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                           HEAD_DIM_PADDED: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS)
    part_row = (splits * tokens + token) * heads + head
    maxima = tl.load(part_stats_ptr + part_row * 2)
    sums = tl.load(part_stats_ptr + part_row * 2 + 1)
    overall = tl.max(maxima, 0)
    weights = tl.where(maxima == float("-inf"), 0.0, tl.exp(maxima - overall))   # splits that saw no key
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_ok = dims < HEAD_DIM
    acc = tl.load(part_acc_ptr + part_row[:, None] * HEAD_DIM + dims[None, :], mask=dim_ok[None, :], other=0.0)
    total = tl.sum(weights * sums, 0)
    out = tl.sum(acc * weights[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + token * out_stride_token + head * out_stride_head + dims, out.to(out_ptr.dtype.element_ty),
             mask=dim_ok)


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
    splits: int = 1
    """Pieces each tile's keys are shared out in (flash-decoding; 1: none), see :func:`kv_splits`."""


def tile_tokens(group: int, max_query_len: int) -> int:
    """Tokens per tile: enough (token, head) rows for the step's longest chunk, at most 64 rows, at least 16
    (``tl.dot``'s smallest) and at least one token's heads."""
    rows = min(64, triton.next_power_of_2(max_query_len * group))
    return max(rows, MIN_DOT, triton.next_power_of_2(group)) // group


def kv_tile(block_size: int) -> int:
    """Keys a program attends to per iteration: the cache block rounded to a power of two, from 16 (``tl.dot``'s
    smallest) to 64. Smaller blocks are gathered several to a tile, larger ones read in parts."""
    return min(64, max(MIN_DOT, triton.next_power_of_2(block_size)))


def kv_splits(programs: int, longest: int, multiprocessors: int | None) -> int:
    """Into how many pieces a step shares out each tile's keys (flash-decoding): 1 unless the step's
    ``programs`` (tiles x KV heads) leave most of the GPU's ``multiprocessors`` idle and its longest sequence
    has keys enough; then a power of two, at most :data:`MAX_SPLITS`, each piece at least
    :data:`MIN_SPLIT_KEYS` keys, and about two programs for each multiprocessor."""
    if not multiprocessors or programs >= multiprocessors:
        return 1
    wanted = min(MAX_SPLITS, longest // MIN_SPLIT_KEYS, -(-2 * multiprocessors // programs))
    return 1 if wanted < 2 else 1 << (wanted.bit_length() - 1)


@functools.cache
def multiprocessors(device: torch.device) -> int | None:
    """The device's streaming multiprocessors; None off CUDA (the interpreter runs programs one by one)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def step_tables(query_lens: Sequence[int], seq_lens: Sequence[int], *, group: int, device: torch.device,
                kv_heads: int = 1, splits: int | None = None) -> StepTables:
    """The kernel's tables for one step, uploaded in one copy. ``splits``: how many pieces to share each tile's
    keys out in (default: :func:`kv_splits` for this step on ``device``)."""
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
    if splits is None:
        splits = kv_splits(len(tile_seq) * kv_heads, max(seq_lens), multiprocessors(device))
    packed = to_device([*q_starts, *seq_lens, *tile_seq, *tile_first], device, dtype=torch.int32)
    seqs, tiles = len(query_lens), len(tile_seq)
    parts = torch.split(packed, [seqs + 1, seqs, tiles, tiles])
    return StepTables(q_starts=parts[0], seq_lens=parts[1], tile_seq=parts[2], tile_first=parts[3], block_q=block_q,
                      splits=splits)


def check_cache(kv_cache: torch.Tensor) -> None:
    """Refuse a cache the kernel cannot walk, saying what to change."""
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"paged attention needs a [2, kv_heads, blocks, block_size, head_dim] cache, not "
                         f"{tuple(kv_cache.shape)}")
    if not kv_cache.is_contiguous():
        raise ValueError("paged attention needs a contiguous KV cache")


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, tables: StepTables,
                    *, scale: float, sliding_window: int | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of a step's new tokens over their sequences' paged KV.

    ``query`` is ``[tokens, heads, head_dim]`` (every sequence's new tokens,
    packed), ``kv_cache`` one layer's ``[2, kv_heads, blocks, block_size,
    head_dim]`` with this step's keys and values already written (in the
    query's dtype, float32, or an fp8 type that the kernel widens),
    ``block_tables`` ``[seqs, max_blocks]``. Returns ``[tokens, heads,
    head_dim]`` in the query's dtype (into ``out`` if given).
    """
    check_cache(kv_cache)
    tokens, heads, head_dim = query.shape
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
    head_dim_padded = max(MIN_DOT, triton.next_power_of_2(head_dim))
    splits = tables.splits
    if splits < 1 or splits & (splits - 1):
        raise ValueError(f"paged attention splits a tile's keys into a power of two of pieces, not {splits}")
    if splits > 1:
        part_acc = torch.empty(splits, tokens, heads, head_dim, dtype=torch.float32, device=query.device)
        part_stats = torch.empty(splits, tokens, heads, 2, dtype=torch.float32, device=query.device)
    else:
        part_acc = part_stats = out                        # not written
    grid = (tables.tile_seq.shape[0], kv_heads, splits)
    _paged_attention_kernel[grid](
        query, kv_cache, out, part_acc, part_stats, block_tables, tables.seq_lens, tables.q_starts,
        tables.tile_seq, tables.tile_first, scale, sliding_window or 0, tokens, heads,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), block_tables.stride(0),
        GROUP=group, BLOCK_Q=tables.block_q, BLOCK_M=block_m, BLOCK_SIZE=block_size, KV_TILE=kv_tile(block_size),
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded, SLIDING=sliding_window is not None,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        DOT_FP32=query.dtype == torch.bfloat16 and interpreted(),  # the interpreter's bf16 tl.dot is wrong
        SPLITS=splits,
    )
    if splits > 1:
        _combine_splits_kernel[(tokens, heads)](
            part_acc, part_stats, out, tokens, heads, out.stride(0), out.stride(1),
            SPLITS=splits, HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded)
    return out
