"""KV blocks for sequences: allocation, sharing and prefix caching.

One pool of fixed-size blocks. A block in use has a reference count (several
sequences with the same prompt prefix share its blocks). Once full, a block's
content is identified by a hash chained over every token before it; a freed
block keeps its hash and stays findable until the pool must reuse it, empty
blocks first, then the least recently freed — automatic prefix caching, as
vLLM's block pool does.

``allocate`` answers False when the pool is out of blocks, so the scheduler
can preempt instead of failing.

Blocks are handed out one at a time, as sequences grow, but placed so that
each sequence's blocks stay consecutive when the pool allows: a sequence
claims a free stretch the size it expects to reach (:meth:`PagedCache.expect`), and
others place their blocks elsewhere while free room lasts. A claim is only a
preference: it holds no memory, and when room runs short any free block is
used. Backends read a consecutive run of blocks as a view instead of a copy
(see ``enigma.backends.torch_cpu.block_runs``), which on CPU is most of the cost of
decode attention.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import attrs
import numpy as np


@attrs.define(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


def chain_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """The hash of a full block: its tokens and everything before them."""
    return hash((parent, tuple(tokens)))


def _stretches(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs ``(first, length)`` of True in ``mask``."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    return [(int(first), int(last - first)) for first, last in zip(edges[::2], edges[1::2])]


def _best_window(eligible: np.ndarray, cached: np.ndarray, recency: np.ndarray, want: int) -> int | None:
    """The start of the ``want`` consecutive ``eligible`` blocks holding the fewest ``cached`` ones, then
    the least ``recency`` in all, then the lowest; None when no run is that long."""
    if want > len(eligible):
        return None
    def window_sums(values: np.ndarray) -> np.ndarray:
        before = np.concatenate(([0], np.cumsum(values, dtype=np.int64)))
        return before[want:] - before[:-want]
    fits = window_sums(eligible) == want
    if not fits.any():
        return None
    starts = np.flatnonzero(fits)
    cost = window_sums(cached)[starts]
    starts = starts[cost == cost.min()]
    age = window_sums(recency)[starts]
    return int(starts[np.argmin(age)])  # argmin: the first, the lowest start


class PagedCache:
    """The builtin ``paged`` cache: block tables over one pool of ``num_blocks`` blocks."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 max_model_len: int | None = None) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a paged cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self._blocks)
        self._by_hash: dict[int, Block] = {}
        self._tables: dict[str, list[Block]] = {}
        self._hashed: dict[str, int] = {}  # request -> how many of its blocks are hashed
        self._roots: dict[str, int | None] = {}  # request -> the hash its chain starts from (its salt)
        self.prefix_queries = 0
        self.prefix_hits = 0
        self._last_lookup: dict[str, tuple[int, int]] = {}
        self._claim_owner: list[str | None] = [None] * num_blocks  # who placed its next blocks here
        self._claims: dict[str, range] = {}
        # the same facts as arrays, for placement's scans over the whole pool (numpy, not Python loops:
        # a small model's pool has tens of thousands of blocks)
        self._is_free = np.ones(num_blocks, dtype=bool)
        self._is_claimed = np.zeros(num_blocks, dtype=bool)
        self._has_hash = np.zeros(num_blocks, dtype=bool)
        self._freed_at = np.zeros(num_blocks, dtype=np.int64)  # when last freed: the order of ``_free``
        self._clock = 0
        self._expected: dict[str, int] = {}  # request -> tokens it may grow to (placement hints)

    # ------------------------------------------------------------ pool

    def _take(self, block: Block) -> Block:
        del self._free[block.block_id]
        self._is_free[block.block_id] = False
        if block.block_hash is not None:           # evict its cached content
            if self._by_hash.get(block.block_hash) is block:
                del self._by_hash[block.block_hash]
            block.block_hash = None
            self._has_hash[block.block_id] = False
        block.ref_count = 1
        return block

    def _next_block(self, request_id: str, table: list[Block], remaining: int) -> Block:
        """A block for the request's next tokens: right after its last one when that is
        free and either in the request's claim or unclaimed and empty (a cached block
        outside the claim is left to placement, which evicts cached content last);
        else the first of a newly placed stretch."""
        if table:
            after = table[-1].block_id + 1
            owner = self._claim_owner[after] if after < self.num_blocks else None
            if after in self._free and (owner == request_id
                                        or (owner is None and self._blocks[after].block_hash is None)):
                return self._take(self._blocks[after])
        return self._take(self._blocks[self._place(request_id, remaining)])

    def _place(self, request_id: str, want: int) -> int:
        """Where a stretch of ``want`` blocks for ``request_id`` starts; claims it.

        In the free stretches nobody else claimed, the ``want`` blocks in a row
        that evict the fewest cached blocks, and of those the least recently
        freed (then the lowest); failing that the longest such stretch;
        failing that (others claimed every free block) the second half of the
        longest free stretch, taken from its claimant.
        """
        eligible = self._is_free & ~self._is_claimed
        for index in self._claims.get(request_id, ()):  # its own claim, where nobody took it over
            if self._claim_owner[index] == request_id and self._is_free[index]:
                eligible[index] = True
        start = _best_window(eligible, self._is_free & self._has_hash, self._recency(), want)
        length = want
        if start is None:
            stretches = _stretches(eligible)
            if stretches:
                start, length = max(stretches, key=lambda run: run[1])
            else:
                first, length = max(_stretches(self._is_free), key=lambda run: run[1])
                start = first + length // 2
                length -= length // 2
        claim = range(start, start + min(want, length))
        self._release_claim(request_id)
        for index in claim:
            self._claim_owner[index] = request_id
        self._is_claimed[claim.start:claim.stop] = True
        self._claims[request_id] = claim
        return start

    def _recency(self) -> np.ndarray:
        """Per block: for a free cached block 1 + its place in the freeing order (oldest first), else 0."""
        free_ids = np.flatnonzero(self._is_free)
        rank = np.empty(len(free_ids), dtype=np.int64)
        rank[np.argsort(self._freed_at[free_ids], kind="stable")] = np.arange(1, len(free_ids) + 1)
        recency = np.zeros(self.num_blocks, dtype=np.int64)
        recency[free_ids] = rank * self._has_hash[free_ids]
        return recency

    def _release_claim(self, request_id: str) -> None:
        owner = self._claim_owner
        for index in self._claims.pop(request_id, ()):
            if owner[index] == request_id:
                owner[index] = None
                self._is_claimed[index] = False

    def _share(self, block: Block) -> None:
        if block.ref_count == 0:
            del self._free[block.block_id]
            self._is_free[block.block_id] = False
        block.ref_count += 1

    def _release(self, block: Block) -> None:
        block.ref_count -= 1
        assert block.ref_count >= 0, "block released more often than taken"
        if block.ref_count == 0:
            self._free[block.block_id] = block
            self._is_free[block.block_id] = True
            self._clock += 1
            self._freed_at[block.block_id] = self._clock

    # ------------------------------------------------------------ requests

    def lookup_prefix(self, request_id: str, token_ids: Sequence[int], *, salt: str | None = None) -> int:
        """Give a new request the cached blocks of its longest cached prefix.

        Only full blocks count, and at least one token is always left to
        compute (its logits are needed). Returns the number of tokens found.
        Requests with different ``salt`` (their LoRA adapter) never share
        blocks: their keys and values differ for the same tokens.
        """
        assert request_id not in self._tables, "lookup_prefix is for requests without blocks"
        table: list[Block] = []
        self._tables[request_id] = table
        self._hashed[request_id] = 0
        root = None if salt is None else hash(("salt", salt))
        self._roots[request_id] = root
        if not self.enable_prefix_caching:
            return 0
        full_blocks = (len(token_ids) - 1) // self.block_size
        parent = root
        self.prefix_queries += len(token_ids)
        for index in range(full_blocks):
            parent = chain_hash(parent, token_ids[index * self.block_size:(index + 1) * self.block_size])
            block = self._by_hash.get(parent)
            if block is None:
                break
            self._share(block)
            table.append(block)
        self._hashed[request_id] = len(table)
        found = len(table) * self.block_size
        self.prefix_hits += found
        self._last_lookup[request_id] = (len(token_ids), found)
        return found

    def cancel(self, request_id: str) -> None:
        """Undo a request's lookup and allocation that could not complete (admission failed):
        its blocks go back, and the lookup does not count in the hit rate."""
        queried, found = self._last_lookup.pop(request_id, (0, 0))
        self.prefix_queries -= queried
        self.prefix_hits -= found
        self.free(request_id)

    def expect(self, request_id: str, num_tokens: int) -> None:
        """A placement hint: ``request_id`` may grow to ``num_tokens`` tokens (prompt + max_tokens).

        Only guides where its blocks go, so that they stay consecutive (the
        torch backend reads consecutive blocks in place); never a reservation.
        The builtin scheduler gives it at admission; forgotten when the request is freed.
        """
        self._expected[request_id] = num_tokens

    def allocate(self, request_id: str, num_tokens: int) -> bool:
        """Make the request's blocks cover ``num_tokens`` tokens in all; False if the pool can't."""
        table = self._tables.setdefault(request_id, [])
        self._hashed.setdefault(request_id, 0)
        needed = -(-num_tokens // self.block_size) - len(table)
        if needed <= 0:
            return True
        if needed > len(self._free):
            return False
        expected_blocks = max(-(-self._expected.get(request_id, 0) // self.block_size), len(table) + needed)
        for _ in range(needed):
            table.append(self._next_block(request_id, table, expected_blocks - len(table)))
        return True

    def commit(self, request_id: str, token_ids: Sequence[int]) -> None:
        """Register the request's newly full blocks (holding ``token_ids``) for prefix caching."""
        if not self.enable_prefix_caching:
            return
        table = self._tables[request_id]
        done = self._hashed[request_id]
        full = min(len(token_ids) // self.block_size, len(table))
        parent = table[done - 1].block_hash if done else self._roots.get(request_id)
        for index in range(done, full):
            block = table[index]
            parent = chain_hash(parent, token_ids[index * self.block_size:(index + 1) * self.block_size])
            block.block_hash = parent
            self._has_hash[block.block_id] = True
            self._by_hash.setdefault(parent, block)
        self._hashed[request_id] = max(done, full)

    def free(self, request_id: str) -> None:
        """Return every block the request holds (tail first, so the tail is evicted first)."""
        for block in reversed(self._tables.pop(request_id, [])):
            self._release(block)
        self._release_claim(request_id)
        self._expected.pop(request_id, None)
        self._hashed.pop(request_id, None)
        self._roots.pop(request_id, None)
        self._last_lookup.pop(request_id, None)

    def block_table(self, request_id: str) -> list[int]:
        return [block.block_id for block in self._tables.get(request_id, [])]

    # ------------------------------------------------------------ accounting

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Free blocks that still hold a findable prefix."""
        return sum(1 for block in self._free.values() if block.block_hash is not None)

    def stats(self) -> dict[str, float]:
        return {
            "kv_blocks_total": self.num_blocks,
            "kv_blocks_used": self.num_used_blocks,
            "kv_blocks_free": self.num_free_blocks,
            "kv_blocks_cached": self.num_cached_blocks,
            "prefix_cache_hit_rate": self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0,
        }


class ContiguousCache(PagedCache):
    """The baseline ``contiguous`` cache: each sequence reserves its maximum length up front.

    What a static max-length KV cache costs, expressed in blocks: a sequence
    takes every block it could ever need at admission, and shares none.
    """

    def __init__(self, num_blocks: int, block_size: int, *, max_model_len: int,
                 enable_prefix_caching: bool = False) -> None:
        super().__init__(num_blocks, block_size, enable_prefix_caching=False)
        self.max_model_len = max_model_len

    def allocate(self, request_id: str, num_tokens: int) -> bool:
        return super().allocate(request_id, max(num_tokens, self.max_model_len))
