"""Sections to passages: at most N tokens of the embedding model, overlapping, cut between sentences.

Each section is tokenized once; sentences are the units a passage is made
of, and a sentence longer than half a passage is cut at token boundaries.
A passage never crosses a section (a page, a heading), so each keeps one
page and one heading path.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable, Iterator

import attrs

from enigma_rag.loaders import Section

TokenSpans = Callable[[str], list[tuple[int, int]]]
"""``text`` → the ``(start, end)`` character span of each of its tokens."""

_SENTENCE_END = re.compile(r"[.!?;:][)\"'\]]*\s+|\n[ \t]*\n\s*")


@attrs.frozen
class Chunk:
    text: str
    start: int
    """Offset of the passage in the document's text."""
    end: int
    page: int | None = None
    heading: tuple[str, ...] = ()


def word_spans(text: str) -> list[tuple[int, int]]:
    """Whitespace-separated words as tokens: for embedders without a tokenizer."""
    return [match.span() for match in re.finditer(r"\S+", text)]


def _sentences(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        spans.append((start, match.start() + 1 if text[match.start()] in ".!?;:" else match.start()))
        start = match.end()
    if start < len(text):
        spans.append((start, len(text)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def _units(text: str, token_starts: list[int], longest: int) -> list[tuple[int, int, int]]:
    """``(start, end, tokens)`` per sentence, sentences over ``longest`` tokens cut into pieces."""
    units = []
    for start, end in _sentences(text):
        first, last = bisect.bisect_left(token_starts, start), bisect.bisect_left(token_starts, end)
        count = last - first
        if count <= longest:
            units.append((start, end, max(count, 1)))
            continue
        for piece in range(first, last, longest):
            piece_end = min(piece + longest, last)
            units.append((max(start, token_starts[piece]) if piece > first else start,
                          token_starts[piece_end] if piece_end < last else end, piece_end - piece))
    return units


def chunk_section(section: Section, token_spans: TokenSpans, *, max_tokens: int, overlap: int) -> Iterator[Chunk]:
    """The passages of one section, in order."""
    text = section.text
    starts = [start for start, _ in token_spans(text)]
    units = _units(text, starts, max(1, max_tokens // 2))
    overlap = min(overlap, max_tokens // 2)
    first = 0
    while first < len(units):
        last, total = first, 0
        while last < len(units) and total + units[last][2] <= max_tokens:
            total += units[last][2]
            last += 1
        start, end = units[first][0], units[last - 1][1]
        piece = text[start:end]
        start += len(piece) - len(piece.lstrip())
        piece = piece.strip()
        yield Chunk(piece, section.offset + start, section.offset + start + len(piece), section.page,
                    section.heading)
        if last == len(units):
            return
        back, carried = last, 0
        while back - 1 > first and carried + units[back - 1][2] <= overlap:
            carried += units[back - 1][2]
            back -= 1
        first = back


def chunk_sections(sections: Iterable[Section], token_spans: TokenSpans, *, max_tokens: int,
                   overlap: int) -> Iterator[Chunk]:
    """The passages of every section, in order, as the sections come (nothing is read ahead)."""
    for section in sections:
        yield from chunk_section(section, token_spans, max_tokens=max_tokens, overlap=overlap)
