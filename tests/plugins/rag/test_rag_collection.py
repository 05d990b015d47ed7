"""Collections through the public API: adding files, searching, answering, and every bad input."""

from __future__ import annotations

import pytest
from enigma_rag import Collection, RAGPipeline
from enigma_rag.answers import INSTRUCTIONS
from rag_files import write_docx, write_pdf

from enigma.errors import BadRequestError, NotFoundError
from enigma.kinds import Document

TOPICS = {
    "volcano.md": "# Volcanoes\n\nA volcano erupts when magma rises through the crust. Lava flows downhill.\n",
    "bread.txt": "Baking bread needs flour, water, yeast and salt. The dough rises before it is baked.\n",
    "orbit.md": "# Orbits\n\n## Moon\n\nThe Moon orbits the Earth every 27 days. Tides follow the Moon.\n",
}


@pytest.fixture
def corpus(tmp_path):
    for name, text in TOPICS.items():
        (tmp_path / name).write_text(text)
    write_pdf(tmp_path / "manual.pdf", [["Widget manual, page one: unpacking the widget."],
                                        ["Page two: the widget's network port is 8080 by default."]])
    write_docx(tmp_path / "ops.docx")
    return tmp_path


@pytest.fixture
def docs(enigma_home, minilm, corpus):
    collection = Collection("docs")
    report = collection.add_documents([corpus])
    assert not report.errors, report.errors
    return collection


def test_files_in_questions_answered_from_the_right_file(docs, corpus):
    assert docs.count() == 5
    best = docs.search("When does a volcano erupt?")[0]
    assert best.metadata["source"] == str(corpus / "volcano.md") and best.metadata["heading"] == ["Volcanoes"]
    hit = docs.search("which port does the widget listen on", top_k=1)[0]
    assert hit.metadata["page"] == 2 and hit.metadata["file"] == "manual.pdf" and "8080" in hit.text
    table = docs.search("metrics port 9090", top_k=1)[0]
    assert table.metadata["heading"] == ["Operations Manual", "Installation", "Ports"]
    assert docs.search("tides and the moon", where={"file": "bread.txt"})[0].metadata["file"] == "bread.txt"
    assert docs.search("tides", where={"file": "nothing.md"}) == []
    assert all(h.score >= 0.3 for h in docs.search("magma and lava", threshold=0.3))
    assert docs.search("quantum chromodynamics lattice", threshold=0.6) == []


def test_hybrid_search_and_a_reranker(docs):
    hybrid = docs.search("yeast dough", hybrid=True, top_k=3)
    assert hybrid[0].metadata["file"] == "bread.txt" and -1 <= hybrid[0].score <= 1
    seen = []

    def worst_first(query, hits):
        seen.append(query)
        return hits[::-1]

    candidates = [hit.id for hit in docs.search("yeast dough", top_k=20)]  # every passage: the corpus is small
    assert [hit.id for hit in docs.search("yeast dough", top_k=2, rerank=worst_first)] == candidates[::-1][:2]
    assert seen == ["yeast dough"]


def test_readding_is_a_no_op_and_a_changed_file_replaces_its_passages(docs, corpus):
    again = docs.add_documents([corpus])
    assert again.count("unchanged") == 5 and docs.count() == 5
    (corpus / "bread.txt").write_text("Sourdough starter is a culture of wild yeast and bacteria.\n")
    report = docs.add_documents([corpus / "bread.txt"])
    assert [r.status for r in report.files] == ["replaced"]
    hits = docs.search("wild yeast culture", where={"file": "bread.txt"})
    assert len(hits) == 1 and "Sourdough" in hits[0].text
    assert docs.delete(str(corpus / "bread.txt")) == 1 and docs.count() == 4
    assert docs.search("sourdough", where={"file": "bread.txt"}) == []


def test_a_failure_mid_file_leaves_the_collection_as_it_was(docs, corpus, monkeypatch):
    big = corpus / "big.txt"
    big.write_text("".join(f"Line {i} of a long file about nothing much at all. " for i in range(3000)))
    before = (docs.count(), docs.retriever.store.chunk_count())
    calls = []
    embed = docs.retriever.embed

    def failing_embed(texts):
        calls.append(len(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user pressed ^C while the third batch embedded
        return embed(texts)

    monkeypatch.setattr(docs.retriever, "embed", failing_embed)
    with pytest.raises(KeyboardInterrupt):
        docs.add_document(big)
    assert (docs.count(), docs.retriever.store.chunk_count()) == before
    assert docs.retriever.store.document(str(big)) is None
    monkeypatch.setattr(docs.retriever, "embed", embed)
    assert docs.add_document(big).status == "added"


def test_bad_files_are_reported_one_by_one_and_the_rest_is_indexed(enigma_home, minilm, corpus):
    (corpus / "empty.txt").write_text("")
    (corpus / "broken.pdf").write_bytes(b"%PDF-1.4 broken")
    (corpus / "broken.docx").write_bytes(b"not a zip")
    (corpus / "sheet.xlsx").write_bytes(b"PK")
    with (corpus / "huge.txt").open("wb") as handle:
        handle.truncate(200_000_000)
    collection = Collection("mixed")
    files = sorted(corpus.iterdir())
    report = collection.add_documents(files)
    failed = {r.source.rsplit("/", 1)[-1]: r.error for r in report.errors}
    assert set(failed) == {"empty.txt", "broken.pdf", "broken.docx", "sheet.xlsx", "huge.txt"}
    assert "is empty" in failed["empty.txt"] and "over the 100 MB limit" in failed["huge.txt"]
    assert "cannot read (.xlsx)" in failed["sheet.xlsx"] and "not a Word document" in failed["broken.docx"]
    assert report.count("added") == 5 and collection.count() == 5


def test_a_missing_collection_and_another_embedding_model_are_refused(enigma_home, minilm):
    with pytest.raises(NotFoundError, match=r"collection 'nope' does not exist; make it with 'enigma rag add nope"):
        Collection("nope", create=False)
    Collection("built").add_text("The river flows to the sea.", source="river")

    class OtherEmbedder:
        name, dimensions, tokenizer = "other-model", 384, None

        def embed(self, texts):
            return [[1.0] * 384 for _ in texts]

    with pytest.raises(BadRequestError, match=r"collection 'built' was embedded with 'all-minilm-l6-v2' \(384 "
                                              r"dimensions\), not 'other-model'"):
        Collection("built", embedder=OtherEmbedder())
    with pytest.raises(BadRequestError, match="collection name '../up' is not valid"):
        Collection("../up")


def test_the_kernel_retriever_contract(enigma_home, minilm):
    from enigma.retrieval import open_retriever

    retriever = open_retriever("auto", collection="notes", embedder=minilm)
    assert type(retriever).__name__ == "VectorRetriever"
    ids = retriever.add([Document(text="Paged attention stores keys and values in blocks.", metadata={"topic": "kv"},
                                  id="kv"),
                         Document(text="Continuous batching lets requests join while others decode.")])
    assert ids[0] == "kv" and retriever.count() == 2
    assert retriever.search("where are keys stored", k=1)[0].metadata["document"] == "kv"
    assert retriever.add([Document(text="Paged attention stores keys and values in blocks.", id="kv")]) == ["kv"]
    assert retriever.count() == 2
    assert retriever.delete(["kv", "missing"]) == 1 and retriever.count() == 1


class RecordingModel:
    """Stands in for the answering LLM: records the messages it is given."""

    def __init__(self):
        self.messages = []

    def chat(self, messages, params):
        from enigma.outputs import CompletionOutput, RequestOutput

        self.messages.append(messages)
        return [RequestOutput(request_id="0", prompt=None, prompt_token_ids=[], finished=True,
                              outputs=[CompletionOutput(index=0, text=" The port is 8080 [1]. ", token_ids=[],
                                                        finish_reason="stop")])]


def test_answers_carry_numbered_sources_or_say_they_do_not_know(enigma_home, minilm, corpus):
    model = RecordingModel()
    rag = RAGPipeline("answers", model=model)  # the seed's name
    rag.add_document(corpus / "manual.pdf")
    rag.add_documents([corpus / "volcano.md", corpus / "bread.txt"])
    answer = rag.query("Which network port does the widget use?", top_k=2)
    assert answer.text == "The port is 8080 [1]."
    assert answer.sources[0].file == str(corpus / "manual.pdf") and answer.sources[0].page == 2
    system = model.messages[-1][0]
    assert system["role"] == "system" and system["content"].startswith(INSTRUCTIONS)
    assert "[1] (manual.pdf, page 2)\nPage two: the widget's network port is 8080" in system["content"]
    assert model.messages[-1][-1] == {"role": "user", "content": "Which network port does the widget use?"}
    nothing = rag.query("Who won the 1954 football world cup?", threshold=0.9)
    assert nothing.sources == ()
    assert "Say that you don't know" in model.messages[-1][0]["content"]


def test_answers_from_a_real_model(enigma_home, minilm, corpus, tmp_path):
    from enigma_rag.answers import context_message, grounded_messages
    from tiny_models import make_model

    from enigma import LLM, SamplingParams

    folder = make_model(tmp_path / "chat", "llama-gqa", template="chatml")
    rag = Collection("real", model=str(folder))
    rag.add_document(corpus / "volcano.md")
    params = SamplingParams(max_tokens=5, temperature=0)
    answer = rag.query("What makes a volcano erupt?", sampling=params)
    assert answer.sources[0].heading == ("Volcanoes",)
    hits = rag.search("What makes a volcano erupt?", threshold=rag.settings.score_threshold)
    messages = grounded_messages([{"role": "user", "content": "What makes a volcano erupt?"}],
                                 context_message(hits, collection="real"))
    assert answer.text == LLM(folder).chat(messages, params)[0].outputs[0].text.strip()  # the grounded prompt ran
