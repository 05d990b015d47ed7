"""The PostgreSQL + pgvector store against a real server: the same answers as the embedded store."""

from __future__ import annotations

import pytest
from enigma_rag import Collection
from enigma_rag.collection import list_collections

from enigma.errors import NotAvailableError, NotFoundError

PASSAGES = [
    ("rivers", "Rivers carry water from mountains to the sea, carving valleys on the way."),
    ("bread", "Bread rises because yeast turns sugar into carbon dioxide."),
    ("moon", "The Moon orbits the Earth and its pull raises the tides."),
    ("python", "A Python list is mutable; a tuple cannot be changed after it is made."),
    ("http", "An HTTP server answers requests on port 80, or 443 with TLS."),
    ("chess", "In chess the knight moves in an L shape and can jump over pieces."),
    ("coffee", "Espresso is brewed by forcing hot water through finely ground coffee."),
    ("volcano", "Magma that reaches the surface is called lava."),
]
QUERIES = ["why does dough rise", "what makes ocean tides", "which containers can be modified in Python",
           "how does a horse piece move in chess", "what port does a web server use", "molten rock"]


def fill(collection):
    for source, text in PASSAGES:
        collection.add_text(text, source=source, metadata={"kind": "science" if source in
                                                                ("rivers", "moon", "volcano", "bread") else "other"})


def test_pgvector_returns_the_embedded_stores_top_k(enigma_home, minilm, postgres_url):
    embedded, shared = Collection("same"), Collection("same", store=postgres_url)
    fill(embedded)
    fill(shared)
    assert shared.count() == embedded.count() == len(PASSAGES)
    assert list_collections(postgres_url) == ["same"]
    for query in QUERIES:
        ours, theirs = embedded.search(query, top_k=4), shared.search(query, top_k=4)
        assert [h.id for h in theirs] == [h.id for h in ours], query
        assert [round(h.score, 4) for h in theirs] == pytest.approx([round(h.score, 4) for h in ours], abs=2e-4)
    where = {"kind": "science"}
    assert [h.id for h in shared.search("water", top_k=3, where=where)] == \
        [h.id for h in embedded.search("water", top_k=3, where=where)]
    assert all(h.metadata["kind"] == "science" for h in shared.search("water", where=where))
    assert shared.search("yeast sugar", hybrid=True)[0].metadata["source"] == "bread"
    assert shared.search("anything", threshold=0.99) == []


def test_pgvector_replaces_deletes_and_drops(enigma_home, minilm, postgres_url):
    shared = Collection("changing", store=postgres_url)
    fill(shared)
    shared.add_text("Sourdough uses wild yeast instead of baker's yeast.", source="bread")
    assert shared.count() == len(PASSAGES)
    assert "Sourdough" in shared.search("wild yeast", top_k=1)[0].text
    assert shared.delete(["bread", "nothing"]) == 1 and shared.count() == len(PASSAGES) - 1
    reopened = Collection("changing", store=postgres_url, create=False)  # another process, another replica
    assert reopened.count() == len(PASSAGES) - 1
    reopened.drop()
    with pytest.raises(NotFoundError, match="collection 'changing' does not exist"):
        Collection("changing", store=postgres_url, create=False)


def test_an_unreachable_database_is_a_clear_error(enigma_home, minilm, tmp_path):
    with pytest.raises(NotAvailableError, match=r"cannot connect to PostgreSQL at postgresql://user:\*\*\*@"):
        Collection("x", store=f"postgresql://user:secret@/db?host={tmp_path}&connect_timeout=2")
