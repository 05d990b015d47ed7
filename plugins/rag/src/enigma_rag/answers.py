"""Answers with sources: passages rendered into the prompt with numbers the model cites."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from enigma.kinds import SearchHit

INSTRUCTIONS = ("Answer the question from the numbered passages below, and cite the passages you use by "
                "their numbers, like [1]. If the passages do not hold the answer, say that you don't know.")
NOTHING_FOUND = ("Nothing in the collection {collection!r} is relevant to this question. Say that you don't "
                 "know the answer from the documents; do not guess.")


@attrs.frozen
class Source:
    """Where a passage of an answer came from."""

    file: str
    page: int | None
    heading: tuple[str, ...]
    chunk: str
    """The passage's id (``document#ordinal``)."""
    score: float
    """Cosine similarity to the question."""
    text: str = ""
    start: int | None = None
    end: int | None = None

    @classmethod
    def from_hit(cls, hit: SearchHit) -> Source:
        meta = hit.metadata
        return cls(file=str(meta.get("source", "")), page=meta.get("page"), heading=tuple(meta.get("heading") or ()),
                   chunk=hit.id, score=round(hit.score, 6), text=hit.text, start=meta.get("start"),
                   end=meta.get("end"))

    def label(self) -> str:
        """``manual.pdf, page 3, Setup > Network``: what a citation shows."""
        parts = [self.file.rsplit("/", 1)[-1] or self.file]
        if self.page is not None:
            parts.append(f"page {self.page}")
        if self.heading:
            parts.append(" > ".join(self.heading))
        return ", ".join(parts)

    def as_json(self) -> dict[str, Any]:
        return {"file": self.file, "page": self.page, "heading": list(self.heading), "chunk": self.chunk,
                "score": self.score, "text": self.text, "start": self.start, "end": self.end}


@attrs.frozen
class Answer:
    """What :meth:`Collection.query` returns: the model's text and the passages it was given."""

    text: str
    sources: tuple[Source, ...] = ()

    def __str__(self) -> str:
        return self.text


def context_message(hits: Sequence[SearchHit], *, collection: str) -> str:
    """The system message that carries the passages (or says that none was found)."""
    if not hits:
        return NOTHING_FOUND.format(collection=collection)
    passages = [f"[{number}] ({Source.from_hit(hit).label()})\n{hit.text}" for number, hit in enumerate(hits, 1)]
    return INSTRUCTIONS + "\n\n" + "\n\n".join(passages)


def grounded_messages(messages: Sequence[dict[str, Any]], context: str) -> list[dict[str, Any]]:
    """``messages`` with the context in their system message (merged into one that is there: many
    chat templates take a single system message, first)."""
    messages = [dict(message) for message in messages]
    if messages and messages[0].get("role") == "system":
        messages[0]["content"] = f"{messages[0].get('content') or ''}\n\n{context}".lstrip()
        return messages
    return [{"role": "system", "content": context}, *messages]
