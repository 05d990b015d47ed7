"""Collections of files: the seed's ``RAGPipeline`` — add documents, search them, answer from them.

>>> from enigma_rag import RAGPipeline
>>> rag = RAGPipeline("manuals")                 # a collection; made on first add
>>> rag.add_document("docs/manual.pdf")
>>> rag.add_documents(["doc1.txt", "doc2.md"])
>>> answer = rag.query("How do I configure the system?")
>>> answer.text, answer.sources

A collection lives in SQLite in the data dir, or in PostgreSQL when
``store="postgres://..."`` (or ``[plugins.rag] store``). Re-adding a file
that did not change does nothing (its content hash); a changed file's
passages are replaced in one transaction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from enigma.errors import BadRequestError, EnigmaError, NotFoundError
from enigma.kinds import SearchHit
from enigma.retrieval import check_collection_name
from enigma_rag.answers import Answer, Source, context_message, grounded_messages
from enigma_rag.loaders import LOADERS, load
from enigma_rag.retriever import Reranker, VectorRetriever
from enigma_rag.settings import is_postgres, rag_settings, store_url

BYTES_PER_MB = 1_000_000


@attrs.frozen
class FileResult:
    """What adding one file did: ``added``, ``replaced``, ``unchanged`` or ``failed`` (with ``error``)."""

    source: str
    status: str
    chunks: int = 0
    error: str | None = None


@attrs.frozen
class IndexReport:
    """What :meth:`Collection.add_documents` did, file by file."""

    files: tuple[FileResult, ...]

    @property
    def errors(self) -> list[FileResult]:
        return [result for result in self.files if result.status == "failed"]

    def count(self, status: str) -> int:
        return sum(result.status == status for result in self.files)


def sqlite_folder(collection: str) -> Path:
    from enigma.paths import get_paths

    return get_paths().data_dir / "retrieval" / "sqlite" / check_collection_name(collection)


def open_store(collection: str, store: str | None = None) -> Any:
    """The store of ``collection``: SQLite in the data dir, or the PostgreSQL at a ``postgres://`` URL."""
    check_collection_name(collection)
    url = store_url(store)
    if is_postgres(url):
        from enigma_rag.pg_store import PostgresStore

        return PostgresStore(url, collection)
    from enigma_rag.sqlite_store import SQLiteStore

    return SQLiteStore(sqlite_folder(collection))


def list_collections(store: str | None = None) -> list[str]:
    """The collections in the store (the configured one unless given)."""
    url = store_url(store)
    if is_postgres(url):
        from enigma_rag.pg_store import list_collections as in_postgres

        return in_postgres(url)
    from enigma_rag.sqlite_store import FILE_NAME

    root = sqlite_folder("default").parent
    return sorted(folder.name for folder in root.glob("*") if (folder / FILE_NAME).is_file()) if root.is_dir() else []


def collection_exists(collection: str, store: str | None = None) -> bool:
    url = store_url(store)
    if is_postgres(url):
        return collection in list_collections(url)
    from enigma_rag.sqlite_store import FILE_NAME

    return (sqlite_folder(collection) / FILE_NAME).is_file()


def file_digest(path: Path) -> str:
    """sha256 of the file, read in 1 MB pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def expand(paths: Iterable[str | Path]) -> list[Path]:
    """Files, with each folder replaced by the readable files under it (hidden ones left out)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOADERS
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        else:
            found.append(path)
    return found


class Collection:
    """A named collection of documents; ``create=False`` refuses one that does not exist yet."""

    def __init__(self, name: str = "default", *, store: str | None = None, embedding_model: str | None = None,
                 embedder: Any = None, model: Any = None, create: bool = True) -> None:
        self.name = check_collection_name(name)
        self.settings = rag_settings()
        if embedder is None and embedding_model is not None:
            from enigma_rag.embedders import embedder_for

            embedder = embedder_for(str(embedding_model))
        if not create and not collection_exists(name, store):
            raise NotFoundError(f"collection {name!r} does not exist; make it with 'enigma rag add {name} FILES...' "
                                "(see 'enigma rag list')")
        self.retriever = VectorRetriever(collection=name, store=open_store(name, store), embedder=embedder,
                                         create=create, settings=self.settings)
        self._model = model

    # ------------------------------------------------------------ adding

    def add_document(self, path: str | Path, *, metadata: Mapping[str, Any] | None = None,
                     progress: Callable[[int], None] | None = None, source: str | None = None) -> FileResult:
        """Index one file; a file that cannot be read raises an error naming it (nothing of it is kept).
        ``source`` names it in the collection (default: its absolute path)."""
        path = Path(path)
        resolved = path.expanduser().resolve()
        source = source or str(resolved)
        sections = load(resolved, max_bytes=int(self.settings.max_file_mb * BYTES_PER_MB))
        digest = file_digest(resolved) if resolved.is_file() else ""
        existing = self.retriever.store.document(source)
        if existing is not None and existing.content_hash == digest:
            return FileResult(source, "unchanged", existing.chunks)
        chunks = self.retriever.index(source, sections, source=source, digest=digest,
                                      metadata={**(metadata or {}), "file": resolved.name}, progress=progress)
        return FileResult(source, "added" if existing is None else "replaced", chunks)

    def add_documents(self, paths: Iterable[str | Path], *, metadata: Mapping[str, Any] | None = None,
                      progress: Callable[[int, int], None] | None = None) -> IndexReport:
        """Index files and folders (their readable files); each file that fails is reported and the
        others are indexed."""
        files = expand(paths)
        results = []
        for done, path in enumerate(files):
            try:
                results.append(self.add_document(path, metadata=metadata))
            except EnigmaError as exc:
                results.append(FileResult(str(path), "failed", error=str(exc)))
            except Exception as exc:  # a loader library's own failure on a strange file
                results.append(FileResult(str(path), "failed", error=f"{path}: {type(exc).__name__}: {exc}"))
            if progress:
                progress(done + 1, len(files))
        return IndexReport(tuple(results))

    def add_text(self, text: str, *, source: str, metadata: Mapping[str, Any] | None = None) -> FileResult:
        """Index a text under the name ``source`` (replacing what was there under that name)."""
        from enigma.kinds import Document

        existed = self.retriever.store.document(source) is not None
        self.retriever.add([Document(text=text, metadata={**(metadata or {}), "source": source}, id=source)])
        record = self.retriever.store.document(source)
        return FileResult(source, "replaced" if existed else "added", record.chunks if record else 0)

    def delete(self, sources: str | Sequence[str]) -> int:
        """Remove documents by source (the path they were added from, or an id); how many existed."""
        if isinstance(sources, str):
            sources = [sources]
        ids = []
        for source in sources:
            path = Path(source).expanduser()
            resolved = str(path.resolve())
            ids.append(resolved if self.retriever.store.document(resolved) is not None else source)
        return self.retriever.delete(ids)

    def documents(self) -> list[Any]:
        return self.retriever.store.documents()

    def count(self) -> int:
        return self.retriever.count()

    def drop(self) -> None:
        """Delete the whole collection."""
        self.retriever.store.drop()

    # ------------------------------------------------------------ asking

    def search(self, query: str, *, top_k: int | None = None, where: Mapping[str, Any] | None = None,
               threshold: float | None = None, hybrid: bool = False, rerank: Reranker | None = None
               ) -> list[SearchHit]:
        """The passages most relevant to ``query``, best first (see :meth:`VectorRetriever.search`)."""
        return self.retriever.search(query, k=top_k or self.settings.top_k, where=where, threshold=threshold,
                                     hybrid=hybrid, rerank=rerank)

    def sources(self, query: str, **options: Any) -> list[Source]:
        """:meth:`search` as :class:`Source`\\ s, with the configured score threshold unless given."""
        options.setdefault("threshold", self.settings.score_threshold)
        return [Source.from_hit(hit) for hit in self.search(query, **options)]

    @property
    def model(self) -> Any:
        """The LLM that answers (``model=`` or ``[plugins.rag] answer_model``), loaded on first use."""
        if self._model is None or isinstance(self._model, (str, Path)):
            from enigma import LLM

            self._model = LLM(self._model or self.settings.answer_model)
        return self._model

    def query(self, question: str, *, top_k: int | None = None, where: Mapping[str, Any] | None = None,
              threshold: float | None = None, hybrid: bool = False, rerank: Reranker | None = None,
              sampling: Any = None, history: Sequence[dict[str, Any]] = ()) -> Answer:
        """Answer ``question`` from the passages that score at least ``threshold`` (the configured
        ``score_threshold`` unless given); with none, the model is told to say it does not know."""
        if not question or not question.strip():
            raise BadRequestError("the question is empty")
        from enigma import SamplingParams

        threshold = self.settings.score_threshold if threshold is None else threshold
        hits = self.search(question, top_k=top_k, where=where, threshold=threshold, hybrid=hybrid, rerank=rerank)
        messages = grounded_messages([*history, {"role": "user", "content": question}],
                                     context_message(hits, collection=self.name))
        params = sampling or SamplingParams(max_tokens=256, temperature=0)
        text = self.model.chat(messages, params)[0].outputs[0].text
        return Answer(text.strip(), tuple(Source.from_hit(hit) for hit in hits))


RAGPipeline = Collection
"""The seed's name for a collection that answers questions."""
