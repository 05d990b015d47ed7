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


class ReferencePlacement(PagedCache):
    """The placement rule written as a plain scan over every block (the implementation before the
    numpy one): the oracle for :meth:`PagedCache._place`."""

    def _place(self, request_id: str, want: int) -> int:
        owner = self._claim_owner
        unclaimed = self._runs(lambda i: owner[i] is None or owner[i] == request_id)
        fitting = [(first, length) for first, length in unclaimed if length >= want]
        if fitting:
            recency = [0] * self.num_blocks
            for rank, block in enumerate(self._free.values(), start=1):
                if block.block_hash is not None:
                    recency[block.block_id] = rank
            cached_before, recency_before = [0], [0]
            for value in recency:
                cached_before.append(cached_before[-1] + (value > 0))
                recency_before.append(recency_before[-1] + value)
            *_, start = min((cached_before[at + want] - cached_before[at],
                             recency_before[at + want] - recency_before[at], at)
                            for first, length in fitting for at in range(first, first + length - want + 1))
            length = want
        elif unclaimed:
            start, length = max(unclaimed, key=lambda run: run[1])
        else:
            first, length = max(self._runs(lambda i: True), key=lambda run: run[1])
            start = first + length // 2
            length -= length // 2
        claim = range(start, start + min(want, length))
        self._release_claim(request_id)
        for index in claim:
            owner[index] = request_id
        self._is_claimed[claim.start:claim.stop] = True
        self._claims[request_id] = claim
        return start

    def _runs(self, eligible) -> list[tuple[int, int]]:
        runs, start = [], None
        for index in range(self.num_blocks + 1):
            ok = index < self.num_blocks and index in self._free and eligible(index)
            if ok and start is None:
                start = index
            elif not ok and start is not None:
                runs.append((start, index - start))
                start = None
        return runs


operations = st.lists(st.tuples(st.sampled_from(["grow", "free", "commit"]), st.integers(0, 5),
                                st.integers(1, 30), st.integers(0, 60)), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(operations, st.integers(4, 40), st.booleans())
def test_placement_equals_the_plain_scan(ops, num_blocks, prefix_caching):
    ours = PagedCache(num_blocks, 2, enable_prefix_caching=prefix_caching)
    reference = ReferencePlacement(num_blocks, 2, enable_prefix_caching=prefix_caching)
    lengths: dict[str, int] = {}
    for op, request, grow_by, expected in ops:
        name = f"r{request}"
        for cache in (ours, reference):
            if op == "grow":
                if name not in cache._tables:  # a new request: its cached prefix first, as admission does
                    cache.lookup_prefix(name, [request] * (lengths.get(name, 0) + grow_by))
                    cache.expect(name, expected + grow_by)
                cache.allocate(name, lengths.get(name, 0) + grow_by)
            elif op == "commit" and name in cache._tables:
                cache.commit(name, [request] * lengths.get(name, 0))
            elif op == "free":
                cache.free(name)
        if op == "grow":
            granted = len(ours.block_table(name)) * 2
            lengths[name] = min(lengths.get(name, 0) + grow_by, granted)
        elif op == "free":
            lengths.pop(name, None)
        assert {r: ours.block_table(r) for r in lengths} == {r: reference.block_table(r) for r in lengths}
