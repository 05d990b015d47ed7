"""Prompt lookup: draft the tokens that followed the context's last n-gram where it occurred before.

No second model: when an answer copies from its prompt (extraction, code
edits, summaries with quotes, RAG answers), the tokens after an earlier
occurrence of the last few tokens are likely to come next. The longest
n-gram (``prompt_lookup_max`` down to ``prompt_lookup_min``) that occurred
before wins, and of its occurrences the most recent. When that occurrence is
fewer than k tokens back, the copy runs on over its own output, as an LZ77
copy does: text that repeats with a period of d tokens is drafted as
repeating on (a loop, a list, a table's rows), not cut off after d tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def lookup_ngram(tokens: Sequence[int], k: int, *, min_n: int = 1, max_n: int = 4) -> list[int]:
    """``k`` tokens that followed the most recent earlier occurrence of the longest final n-gram of
    ``tokens`` (``min_n <= n <= max_n``), the copy running on over its own output when the occurrence
    is fewer than k tokens back; empty when there is none."""
    length = len(tokens)
    if k < 1 or length < min_n + 1:
        return []
    array = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        pattern = array[-n:]
        windows = np.lib.stride_tricks.sliding_window_view(array[:-1], n)  # starts 0 .. length - 1 - n
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if len(hits):
            follow = int(hits[-1]) + n
            drafts = array[follow:follow + k].tolist()
            period = length - follow
            while len(drafts) < k:
                drafts.append(drafts[len(drafts) - period])
            return drafts
    return []


class NgramProposer:
    """Drafts by prompt lookup (see :func:`lookup_ngram`); holds no state and no KV."""

    needs_kv = False

    def __init__(self, *, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, requests: Sequence, lengths: Sequence[int], block_tables: Sequence[Sequence[int]]
                ) -> list[tuple[list[int], None]]:
        """Per request, its drafts (at most its ``lengths`` entry) and no distribution (point masses)."""
        return [(lookup_ngram(request.all_token_ids(), k, min_n=self.min_n, max_n=self.max_n), None)
                for request, k in zip(requests, lengths)]

    def forget(self, request_id: str) -> None:
        """Nothing is kept per request."""
