"""The paged-attention kernel against the reference backend's gather-and-SDPA, on shuffled block tables: any
block size, split keys (flash-decoding) and fp8 caches."""

from __future__ import annotations

import attrs
import pytest
import torch
from enigma_cuda_paged.kernels import kv_splits, kv_tile, paged_attention, step_tables, tile_tokens
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enigma.attention import AttentionMetadata
from enigma.backends.torch_backend import TorchBackend, write_kv


def scattered(query_lens, seq_lens, *, block_size, window=None, spare=3, seed=0):
    """Metadata whose sequences own blocks in a shuffled order (not consecutive), in a pool with spare blocks."""
    metadata = AttentionMetadata.contiguous(query_lens, seq_lens, block_size=block_size, sliding_window=window)
    used = int(metadata.block_tables.max()) + 1
    order = torch.randperm(used + spare, generator=torch.Generator().manual_seed(seed))[:used]
    tables = order[metadata.block_tables]
    slots = order[metadata.slot_mapping // block_size] * block_size + metadata.slot_mapping % block_size
    return attrs.evolve(metadata, block_tables=tables, slot_mapping=slots), used + spare


def compare(query_lens, seq_lens, *, heads, kv_heads, head_dim, block_size=16, window=None,
            dtype=torch.float32, cache_dtype=None, splits=1, device="cpu", seed=0):
    """The kernel's output and the reference's, for one step over a cache holding random earlier tokens. An
    fp8 cache's reference attends over the values the cache holds (widened)."""
    metadata, blocks = scattered(query_lens, seq_lens, block_size=block_size, window=window, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(query_lens)
    cache_dtype = cache_dtype or dtype
    query, key, value = (torch.randn(tokens, n, head_dim, generator=generator).to(dtype)
                         for n in (heads, kv_heads, kv_heads))
    cache = torch.randn(2, kv_heads, blocks, block_size, head_dim, generator=generator).to(cache_dtype)
    stored_key, stored_value = (part.to(cache_dtype).float() for part in (key, value))
    expected = TorchBackend(device="cpu").attention(query.float(), stored_key, stored_value,
                                                    kv_cache=cache.float(), metadata=metadata,
                                                    scale=head_dim ** -0.5)
    cache = cache.to(device)
    write_kv(cache, key.to(device), value.to(device), metadata.slot_mapping.to(device))
    tables = step_tables(query_lens, seq_lens, group=heads // kv_heads, device=torch.device(device),
                         kv_heads=kv_heads, splits=splits)
    got = paged_attention(query.to(device), cache, metadata.block_tables.to(device), tables,
                          scale=head_dim ** -0.5, sliding_window=window)
    assert got.dtype == dtype and got.shape == query.shape
    return got.float().cpu(), expected


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 4, 8]),
       head_dim=st.sampled_from([16, 32, 48, 80]), block_size=st.sampled_from([1, 4, 8, 16, 24, 32, 128]),
       window=st.sampled_from([None, 5, 20]), splits=st.sampled_from([1, 1, 2, 4]))
def test_kernel_matches_the_reference_on_any_step(data, kv_heads, group, head_dim, block_size, window, splits,
                                                  device):
    seqs = data.draw(st.integers(1, 4))
    query_lens, seq_lens = [], []
    for _ in range(seqs):
        seq_len = data.draw(st.integers(1, 70))
        query_lens.append(data.draw(st.sampled_from([1, 1, min(3, seq_len), seq_len, data.draw(
            st.integers(1, seq_len))])))
        seq_lens.append(seq_len)
    got, expected = compare(query_lens, seq_lens, heads=kv_heads * group, kv_heads=kv_heads, head_dim=head_dim,
                            block_size=block_size, window=window, splits=splits, device=device)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_caches(dtype, device):
    got, expected = compare([1, 9, 1], [40, 9, 17], heads=8, kv_heads=2, head_dim=64, dtype=dtype, device=device)
    # inputs rounded to 8 (bf16) or 11 (fp16) bits, products accumulated in float32
    tolerance = 3e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_long_prefill_tiles_and_decodes_in_one_step(device):
    # 150 new tokens in tiles of many rows beside decodes of long histories
    assert tile_tokens(1, 150) == 64 and tile_tokens(8, 1) == 2 and tile_tokens(32, 1) == 1
    got, expected = compare([150, 1, 1], [150, 300, 2], heads=4, kv_heads=4, head_dim=32, device=device)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_step_tables_say_where_each_tile_starts():
    tables = step_tables([3, 1, 40], [10, 7, 40], group=1, device=torch.device("cpu"))
    assert tables.block_q == 64
    assert tables.q_starts.tolist() == [0, 3, 4, 44] and tables.seq_lens.tolist() == [10, 7, 40]
    assert tables.tile_seq.tolist() == [0, 1, 2] and tables.tile_first.tolist() == [0, 0, 0]
    tables = step_tables([20, 1], [20, 9], group=4, device=torch.device("cpu"))
    assert tables.block_q == 16
    assert tables.tile_seq.tolist() == [0, 0, 1] and tables.tile_first.tolist() == [0, 16, 0]


def test_kv_tiles_gather_small_blocks_and_read_big_ones_in_parts():
    assert [kv_tile(size) for size in (1, 4, 16, 24, 32, 64, 256)] == [16, 16, 16, 32, 32, 64, 64]


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fp8_caches_are_widened_as_they_are_read(dtype, cache_dtype, device):
    got, expected = compare([1, 9, 1], [40, 9, 70], heads=8, kv_heads=2, head_dim=64, dtype=dtype,
                            cache_dtype=cache_dtype, device=device)
    # the cache's values are exact in every query dtype: only the query's rounding and the products remain
    tolerance = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_fp8_writes_saturate_instead_of_overflowing():
    cache = torch.zeros(2, 1, 2, 4, 16, dtype=torch.float8_e4m3fn)
    key = torch.tensor([1000.0, -1e6, 0.3, float("inf")]).repeat(4)[None, None, :].expand(1, 1, 16)
    write_kv(cache, key, -key, torch.tensor([5]))
    stored = cache.float().view(2, 8, 16)[:, 5]
    assert stored[0, :4].tolist() == [448.0, -448.0, 0.3125, 448.0] and not stored.isnan().any()
    assert torch.equal(stored[1], -stored[0])
    assert cache.float().view(2, 8, 16)[:, :5].abs().sum() == 0                   # other slots untouched


def test_split_keys_merge_to_the_whole(device):
    # sequences shorter than the splits leave some of them empty; windows start splits mid-history
    for window in (None, 30):
        got, expected = compare([1, 1, 1, 4], [300, 5, 129, 200], heads=8, kv_heads=2, head_dim=32, window=window,
                                splits=8, device=device)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_splits_go_where_programs_leave_the_gpu_idle():
    assert kv_splits(4, 2048, 132) == 8                  # batch-1 decode, 4 KV heads, a long history
    assert kv_splits(4, 100_000, 132) == 16               # at most 16
    assert kv_splits(4, 600, 132) == 2                    # each split at least 256 keys
    assert kv_splits(64, 2048, 132) == 4                  # about two programs per multiprocessor
    assert kv_splits(4, 300, 132) == 1 and kv_splits(200, 4096, 132) == 1
    assert kv_splits(4, 4096, None) == 1                  # the interpreter: no multiprocessors to fill
    tables = step_tables([1], [4096], group=4, device=torch.device("cpu"), kv_heads=4)
    assert tables.splits == 1
    assert step_tables([1], [4096], group=4, device=torch.device("cpu"), kv_heads=4, splits=4).splits == 4
    three = step_tables([1], [40], group=1, device=torch.device("cpu"), splits=3)
    with pytest.raises(ValueError, match="power of two of pieces, not 3"):
        paged_attention(torch.zeros(1, 1, 16), torch.zeros(2, 1, 4, 16, 16), torch.zeros(1, 3, dtype=torch.long),
                        three, scale=1.0)


def test_a_query_that_does_not_fit_the_cache_is_refused():
    cache = torch.zeros(2, 2, 4, 16, 32)
    tables = step_tables([1], [3], group=1, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"query \(1, 3, 32\) does not fit a cache of 2 KV heads"):
        paged_attention(torch.zeros(1, 3, 32), cache, torch.zeros(1, 1, dtype=torch.long), tables, scale=1.0)
