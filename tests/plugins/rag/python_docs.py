"""A retrieval test no one tuned for: the CPython 3.11 docs (Debian's python3.11-doc) and questions made from them.

The corpus is the tutorial and the glossary as reStructuredText sources.
Questions: each tutorial section's title (relevant: the passages under
that title), and "What is <term>?" for each glossary term (relevant: the
passage that holds the start of its definition).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

INSTALLED = Path("/usr/share/doc/python3.11/html/_sources")
IN_PACKAGE = Path("usr/share/doc/python3.11/html/_sources")
CACHE = Path(os.environ.get("ENIGMA_ORACLE_CACHE", Path.home() / ".cache" / "enigma-test-oracles"))


def docs_sources() -> Path:
    """The docs' ``_sources`` folder: installed, cached, or fetched with ``apt-get download`` (cached)."""
    if INSTALLED.is_dir():
        return INSTALLED
    unpacked = CACHE / "python3.11-doc"
    if not (unpacked / IN_PACKAGE).is_dir():
        with tempfile.TemporaryDirectory() as work:
            subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=work, check=True, capture_output=True,
                           timeout=600)
            deb = next(Path(work).glob("python3.11-doc_*.deb"))
            staging = Path(work) / "unpacked"
            subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True, timeout=600)
            CACHE.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(unpacked, ignore_errors=True)
            shutil.move(str(staging), unpacked)
    return unpacked / IN_PACKAGE


def corpus_files(sources: Path) -> list[Path]:
    return [*sorted((sources / "tutorial").glob("*.rst.txt")), sources / "glossary.rst.txt"]


def _normal(text: str) -> str:
    return " ".join(text.split())


def glossary_terms(sources: Path) -> list[tuple[str, str]]:
    """``(term, first words of its definition)`` for each glossary entry."""
    lines = (sources / "glossary.rst.txt").read_text().splitlines()
    terms = []
    for index, line in enumerate(lines[:-1]):
        match = re.fullmatch(r" {3}(\S[^:]*)", line)
        definition = lines[index + 1]
        if match and definition.startswith("      ") and definition.strip():
            terms.append((match.group(1).strip(), _normal(definition)[:40]))
    return terms


def questions(sources: Path, passages: list[tuple[str, str, tuple[str, ...]]]) -> list[tuple[str, set[str]]]:
    """``(question, ids of the relevant passages)``; ``passages`` are ``(id, text, heading path)``."""
    asked = []
    titles: dict[str, set[str]] = {}
    for passage_id, _, heading in passages:
        if len(heading) >= 2 and "glossary" not in passage_id:
            titles.setdefault(heading[-1], set()).add(passage_id)
    asked += [(title, ids) for title, ids in sorted(titles.items())]
    for term, start in glossary_terms(sources):
        relevant = {pid for pid, text, _ in passages if start in _normal(text)}
        if relevant:
            asked.append((f"What is {term}?", relevant))
    return asked


def evaluate(collection, asked: list[tuple[str, set[str]]], *, k: int = 5, **options) -> tuple[float, float]:
    """recall@k and MRR (over the first k) of ``collection``'s search."""
    found, reciprocal = 0, 0.0
    for question, relevant in asked:
        ids = [hit.id for hit in collection.search(question, top_k=k, **options)]
        ranks = [rank for rank, hit_id in enumerate(ids, 1) if hit_id in relevant]
        found += bool(ranks)
        reciprocal += 1 / ranks[0] if ranks else 0.0
    return found / len(asked), reciprocal / len(asked)
