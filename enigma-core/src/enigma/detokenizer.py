"""Incremental detokenization for streaming.

Decoding token by token breaks multi-byte characters (a byte-level BPE token
can hold half an emoji) and loses context-dependent spacing (SentencePiece
drops a leading space at the start of a decode). So, as vLLM does, each step
decodes a short window that starts a few tokens back, emits only the text
beyond what that window's prefix already gave, and holds back text that ends
in an incomplete character until the bytes that complete it arrive.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5
"""Prompt tokens decoded with the first output tokens, for correct spacing."""


class _Decoder(Protocol):
    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas."""

    def __init__(self, tokenizer: _Decoder, prompt_token_ids: Sequence[int] = (), *,
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self._tokens = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.text = ""
        """All text emitted so far."""

    def _decode(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(tokens, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Append one token; return the new text it completes (maybe empty)."""
        self._tokens.append(token_id)
        prefix_text = self._decode(self._tokens[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._tokens[self._prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT):
            return ""  # nothing new, or an incomplete character: wait for more bytes
        delta = full_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end: emit held-back text even if it is an incomplete character."""
        if self._read_offset == len(self._tokens):
            return ""
        prefix_text = self._decode(self._tokens[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._tokens[self._prefix_offset:])
        delta = full_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        self.text += delta
        return delta
