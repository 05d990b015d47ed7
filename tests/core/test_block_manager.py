"""The paged cache's block placement: sequences that grow together keep their blocks consecutive."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from enigma.backends.torch_cpu import block_runs
from enigma.engine.block_manager import PagedCache


def grow(cache, request_id, num_tokens, expected):
    """Allocate with the placement hint the builtin scheduler gives at admission."""
    if expected is not None:
        cache.expect(request_id, expected)
    return cache.allocate(request_id, num_tokens)


def grow_together(cache, requests, steps, expected):
    """Allocate like decoding does: every request one token further, round after round."""
    lengths = dict.fromkeys(requests, 1)
    for _ in range(steps):
        for request in requests:
            lengths[request] += 1
            assert grow(cache, request, lengths[request], expected)


def test_sequences_growing_together_stay_consecutive():
    cache = PagedCache(num_blocks=64, block_size=4)
    grow_together(cache, ["a", "b", "c"], steps=40, expected=48)
    for request in "abc":
        table = cache.block_table(request)
        assert len(table) == 11
        assert len(block_runs(table)) == 1, table


def test_without_a_hint_growing_sequences_interleave():
    # the old behaviour, for contrast: no expected length, no room kept
    cache = PagedCache(num_blocks=64, block_size=4)
    grow_together(cache, ["a", "b"], steps=20, expected=None)
    assert len(block_runs(cache.block_table("a"))) > 1


def test_when_claims_cover_the_pool_a_newcomer_splits_the_longest_free_stretch():
    cache = PagedCache(num_blocks=16, block_size=1)
    assert grow(cache, "a", 1, 16)      # claims the whole pool
    assert grow(cache, "b", 1, 8)       # takes the back half of what is free
    assert cache.block_table("a") == [0]
    assert cache.block_table("b") == [8]
    grow_together(cache, ["a", "b"], steps=7, expected=None)
    assert block_runs(cache.block_table("a")) == ((0, 8),)
    assert block_runs(cache.block_table("b")) == ((8, 8),)


def test_empty_blocks_are_placed_before_cached_ones():
    cache = PagedCache(num_blocks=12, block_size=2)
    tokens = list(range(8))
    assert grow(cache, "old", 8, 8)
    cache.commit("old", tokens)
    cache.free("old")                                      # 4 cached blocks, findable
    assert grow(cache, "new", 2, 8)
    assert not set(cache.block_table("new")) & {0, 1, 2, 3}
    cache.free("new")
    assert cache.lookup_prefix("probe", [*tokens, 99]) == 8  # the old prefix survived


def test_a_full_pool_still_allocates_every_block():
    cache = PagedCache(num_blocks=10, block_size=1)
    assert grow(cache, "a", 3, 10)
    assert grow(cache, "b", 3, 10)
    assert grow(cache, "c", 4, 10)
    assert cache.num_free_blocks == 0
    assert not cache.allocate("a", 4)
    assert sorted(cache.block_table("a") + cache.block_table("b") + cache.block_table("c")) == list(range(10))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(1, 12), st.integers(0, 40), st.booleans()),
                max_size=40))
def test_placement_never_hands_out_a_block_twice(operations):
    cache = PagedCache(num_blocks=24, block_size=2)
    sizes: dict[str, int] = {}
    for request, more, expected, free in operations:
        if free:
            cache.free(request)
            sizes.pop(request, None)
            continue
        want = sizes.get(request, 0) + more
        if grow(cache, request, want, expected or None):
            sizes[request] = want
        held = [block for name in sizes for block in cache.block_table(name)]
        assert len(held) == len(set(held))
        assert cache.num_used_blocks == len(held)
    for request in list(sizes):
        cache.free(request)
    assert cache.num_free_blocks == 24


def test_among_cached_blocks_the_least_recently_freed_go_first():
    cache = PagedCache(num_blocks=8, block_size=1)
    for name, tokens in (("first", [1, 2, 3, 4]), ("second", [5, 6, 7, 8])):
        assert grow(cache, name, 4, 4)
        cache.commit(name, tokens)
    cache.free("second")                                   # freed first: evicted first,
    cache.free("first")                                    # though it lies at higher block ids
    assert grow(cache, "new", 4, 4)
    assert cache.block_table("new") == [4, 5, 6, 7]
    assert cache.lookup_prefix("probe-kept", [1, 2, 3, 4, 0]) == 4
    assert cache.lookup_prefix("probe-evicted", [5, 6, 7, 8, 0]) == 0


def test_growing_past_a_claim_does_not_evict_a_cached_neighbour():
    cache = PagedCache(num_blocks=12, block_size=1)
    assert grow(cache, "a", 2, 2)      # blocks 0, 1
    assert grow(cache, "old", 4, 4)    # blocks 2-5, right after a's
    cache.commit("old", [1, 2, 3, 4])
    cache.free("old")                                     # cached and unclaimed now
    assert cache.allocate("a", 3)                         # grows past its claim
    assert cache.block_table("a")[2] not in {2, 3, 4, 5}
    assert cache.lookup_prefix("probe", [1, 2, 3, 4, 0]) == 4
