"""What a backend's attention needs to know about one engine step.

The engine packs every scheduled sequence's new tokens into one flat batch
(prefills and decodes together, vLLM-style). Keys and values live in a paged
KV cache: per layer one tensor holding ``num_blocks`` blocks of
``block_size`` token slots (its exact layout is the backend's choice, see
``Backend.kv_cache_shape``); each sequence owns a list of blocks (its block
table), and slot ``block * block_size + offset`` holds one token.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import attrs


@attrs.frozen(kw_only=True)
class AttentionMetadata:
    """Layout of one step's flat batch and where its KV lives.

    Sequence ``i`` contributes ``query_lens[i]`` new tokens (its last ones) and
    attends over ``seq_lens[i]`` tokens in all (cached + new).
    """

    query_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]
    slot_mapping: Any
    """LongTensor ``[num_tokens]``: the flat cache slot (block * block_size + offset) of each new token."""
    block_tables: Any
    """LongTensor ``[num_seqs, max_blocks]``: each sequence's blocks, padded with 0."""
    block_size: int
    sliding_window: int | None = None
    """Attend only to the last ``sliding_window`` positions (Mistral-style), or all."""

    @classmethod
    def contiguous(cls, query_lens: Sequence[int], seq_lens: Sequence[int], *, block_size: int,
                   device: Any = "cpu", sliding_window: int | None = None) -> AttentionMetadata:
        """Lay sequence ``i`` out in consecutive blocks after sequence ``i-1``'s.

        For callers without a block manager (one-off checks, tests). The cache
        needs ``metadata.block_tables.max() + 1`` blocks at least.
        """
        import torch

        if len(query_lens) != len(seq_lens) or any(q > s for q, s in zip(query_lens, seq_lens)):
            raise ValueError("each sequence needs query_len <= seq_len")
        blocks_per_seq = [-(-length // block_size) for length in seq_lens]
        max_blocks = max(blocks_per_seq)
        tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.long)
        slots = []
        first = 0
        for index, (query_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
            table = torch.arange(first, first + blocks_per_seq[index])
            tables[index, : len(table)] = table
            positions = torch.arange(seq_len - query_len, seq_len)
            slots.append(table[positions // block_size] * block_size + positions % block_size)
            first += blocks_per_seq[index]
        return cls(
            query_lens=tuple(query_lens),
            seq_lens=tuple(seq_lens),
            slot_mapping=torch.cat(slots).to(device),
            block_tables=tables.to(device),
            block_size=block_size,
            sliding_window=sliding_window,
        )

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)


@attrs.define
class ForwardContext:
    """Everything a model's attention layers need for one forward pass."""

    backend: Any
    """The :class:`enigma.kinds.Backend` whose ``attention`` the layers call."""
    metadata: AttentionMetadata
    kv_caches: Sequence[Any]
    """One paged cache tensor per layer."""
    adapters: Sequence[str | None] = ()
    """Per chunk of the batch, the adapter (a LoRA's name) its tokens run with, or None for the base
    model; empty when no chunk has one. Adapter layers read it through :func:`current_forward_context`."""
    _by_window: dict[int | None, AttentionMetadata] = attrs.field(factory=dict, init=False)

    def metadata_for(self, sliding_window: int | None) -> AttentionMetadata:
        """The step's metadata with a layer's own sliding window (Qwen2 mixes them)."""
        if sliding_window == self.metadata.sliding_window:
            return self.metadata
        if sliding_window not in self._by_window:
            self._by_window[sliding_window] = attrs.evolve(self.metadata, sliding_window=sliding_window)
        return self._by_window[sliding_window]


_CURRENT: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar("enigma_forward_context",
                                                                              default=None)


def current_forward_context() -> ForwardContext | None:
    """The context of the forward pass running now (set by the runner), for layers that need more than
    their input: per-request adapters. None outside a forward pass."""
    return _CURRENT.get()


@contextlib.contextmanager
def forward_context(context: ForwardContext) -> Iterator[ForwardContext]:
    """Make ``context`` the :func:`current_forward_context` for the duration."""
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)
