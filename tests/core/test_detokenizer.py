"""Streaming detokenization: never broken UTF-8, same text as decoding at once."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enigma.detokenizer import REPLACEMENT, IncrementalDetokenizer
from enigma.tokenizer import Tokenizer

PIECES = list("ab cd.\n") + list("éüñ東京Россия") + ["🚀", "🎉", "👍🏽", "ﬁ"]
TEXT = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tiny_models import write_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder)
    return Tokenizer(folder)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def byte_token_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte: the worst split a model can produce."""
    table = _bytes_to_unicode()
    return [tokenizer.token_to_id(table[byte]) for byte in text.encode()]


def stream(tokenizer, prompt_ids, output_ids):
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detokenizer.add(token) for token in output_ids]
    deltas.append(detokenizer.flush())
    return deltas


@settings(max_examples=150, deadline=None)
@given(prompt=TEXT, output=TEXT)
def test_deltas_join_to_the_full_decode(tokenizer, prompt, output):
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    output_ids = tokenizer.encode(output, add_special_tokens=False)
    deltas = stream(tokenizer, prompt_ids, output_ids)
    assert "".join(deltas) == tokenizer.decode(output_ids) == output
    assert not any(REPLACEMENT in delta for delta in deltas)


@settings(max_examples=150, deadline=None)
@given(prompt=TEXT, output=TEXT)
def test_byte_by_byte_tokens_never_emit_broken_characters(tokenizer, prompt, output):
    output_ids = byte_token_ids(tokenizer, output)
    deltas = stream(tokenizer, byte_token_ids(tokenizer, prompt), output_ids)
    assert "".join(deltas) == output
    assert not any(REPLACEMENT in delta for delta in deltas)


def test_incomplete_character_is_held_back_then_flushed(tokenizer):
    ids = byte_token_ids(tokenizer, "🚀")
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert [detokenizer.add(i) for i in ids[:3]] == ["", "", ""]
    assert detokenizer.add(ids[3]) == "🚀"
    cut = IncrementalDetokenizer(tokenizer)
    for i in ids[:2]:
        cut.add(i)
    assert cut.flush() == tokenizer.decode(ids[:2])  # a stream cut mid-character ends as decoding would


def test_leading_space_kept_from_prompt_context(tokenizer):
    prompt_ids = tokenizer.encode("Once upon", add_special_tokens=False)
    output_ids = tokenizer.encode(" a time", add_special_tokens=False)
    assert "".join(stream(tokenizer, prompt_ids, output_ids)) == " a time"
