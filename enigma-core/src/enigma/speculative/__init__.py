"""Speculative decoding: a cheap proposer drafts tokens, the target verifies k at a time.

- :mod:`~enigma.speculative.config`: :class:`SpeculativeConfig` (draft model, prompt lookup, self-draft).
- :mod:`~enigma.speculative.ngram`, :mod:`~enigma.speculative.draft_model`: the proposers.
- :mod:`~enigma.speculative.rejection`: verification that keeps the target's distribution.
- :mod:`~enigma.speculative.length`: the adaptive number of drafts.
- :mod:`~enigma.speculative.speculator`: how the engine uses them.
"""

from enigma.speculative.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
