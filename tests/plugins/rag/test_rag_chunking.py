"""Passages: at most N tokens of the embedding model, overlapping, cut between sentences, offsets exact."""

from __future__ import annotations

import re
from itertools import pairwise

from enigma_rag.chunking import chunk_section, word_spans
from enigma_rag.loaders import Section
from hypothesis import given, settings
from hypothesis import strategies as st

SENTENCES = [f"Sentence number {i} talks about topic {i % 7} in a few plain words." for i in range(60)]


def token_count(minilm, text):
    return len(minilm.tokenizer.token_spans(text))


def test_passages_fit_the_model_overlap_and_end_at_sentences(minilm):
    text = " ".join(SENTENCES)
    section = Section(text, offset=100, page=4, heading=("Guide", "Topics"))
    chunks = list(chunk_section(section, minilm.tokenizer.token_spans, max_tokens=64, overlap=16))
    assert len(chunks) > 5
    for chunk in chunks:
        assert token_count(minilm, chunk.text) <= 64
        assert chunk.text.endswith(".") and chunk.text.startswith("Sentence number")  # whole sentences
        assert text[chunk.start - 100:chunk.end - 100] == chunk.text
        assert chunk.page == 4 and chunk.heading == ("Guide", "Topics")
    for before, after in pairwise(chunks):
        last_sentence = before.text.rsplit("Sentence number", 1)[1]
        assert after.text.startswith("Sentence number" + last_sentence)  # the overlap carries a sentence
        assert after.start < before.end and after.start > before.start
    covered = " ".join(chunk.text for chunk in chunks)
    assert all(sentence in covered for sentence in SENTENCES)


def test_a_sentence_longer_than_a_passage_is_cut_at_tokens(minilm):
    words = " ".join(f"word{i}" for i in range(400))  # one "sentence" of ~1,200 tokens
    chunks = list(chunk_section(Section(words, 0), minilm.tokenizer.token_spans, max_tokens=50, overlap=0))
    assert all(token_count(minilm, chunk.text) <= 50 for chunk in chunks)
    assert " ".join(chunk.text for chunk in chunks).replace(" ", "") == words.replace(" ", "")


def test_without_overlap_passages_do_not_repeat(minilm):
    text = " ".join(SENTENCES)
    chunks = list(chunk_section(Section(text, 0), minilm.tokenizer.token_spans, max_tokens=80, overlap=0))
    assert all(after.start >= before.end for before, after in pairwise(chunks))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="abc .!?\n", min_size=1, max_size=40), min_size=1, max_size=30),
       st.integers(4, 40), st.integers(0, 20))
def test_every_word_lands_in_a_passage_of_bounded_size(pieces, max_tokens, overlap):
    text = "".join(pieces).strip()
    if not text:
        return
    chunks = list(chunk_section(Section(text, 7), word_spans, max_tokens=max_tokens, overlap=overlap))
    for chunk in chunks:
        assert text[chunk.start - 7:chunk.end - 7] == chunk.text
        assert len(word_spans(chunk.text)) <= max_tokens + 1  # a cut may split a word in two tokens' worth
    starts = [chunk.start for chunk in chunks]
    assert starts == sorted(set(starts))  # always moving forward
    covered = set()
    for chunk in chunks:
        covered.update(range(chunk.start - 7, chunk.end - 7))
    assert all(i in covered for match in re.finditer(r"\S", text) for i in [match.start()])
