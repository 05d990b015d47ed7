"""``enigma rag``: add, query, search, list, show and rm collections from the command line."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

STORE = click.option("--store", metavar="URL", default=None,
                     help="postgres://... for PostgreSQL + pgvector (default: [plugins.rag] store; SQLite).")


def _pairs(values: tuple[str, ...], option: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", param_hint=option)
        try:
            result[key] = json.loads(text)
        except json.JSONDecodeError:
            result[key] = text
    return result


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc)) from exc


@click.group(epilog="""
\b
Examples:
  enigma rag add manuals docs/                      index every PDF, DOCX, MD, TXT, HTML, RST file under docs/
  enigma rag query manuals "How do I configure the network?"
  enigma rag search manuals "network" --top-k 8 --where file=setup.pdf
  enigma rag add shared *.pdf --store postgres://user:pw@db/rag
""")
def rag() -> None:
    """Ground answers in documents: collections of files, searched by meaning."""


@rag.command()
@click.argument("collection")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--embedding-model", metavar="MODEL", help="Embed a new collection with this model.")
@click.option("--metadata", "metadata", multiple=True, metavar="KEY=VALUE", help="Metadata for every file added.")
@STORE
def add(collection: str, paths: tuple[str, ...], embedding_model: str | None, metadata: tuple[str, ...],
        store: str | None) -> None:
    """Add files and folders to COLLECTION (made if new); unchanged files are skipped."""
    from enigma.errors import EnigmaError
    from enigma_cli.progress import ProgressBar
    from enigma_rag.collection import Collection

    try:
        target = Collection(collection, store=store, embedding_model=embedding_model)
        with ProgressBar(f"indexing {collection}") as bar:
            report = target.add_documents(paths, metadata=_pairs(metadata, "--metadata"), progress=bar.update)
    except EnigmaError as exc:
        _fail(exc)
    for result in report.files:
        if result.status == "failed":
            click.echo(f"failed     {result.error}", err=True)
        else:
            click.echo(f"{result.status:<10} {result.source} ({result.chunks} passages)")
    summary = ", ".join(f"{report.count(status)} {status}" for status in ("added", "replaced", "unchanged", "failed")
                        if report.count(status))
    click.echo(f"{collection}: {summary or 'no files'}; {target.count()} documents in all")
    if report.errors:
        sys.exit(1)


def _search_options(top_k: int | None, where: tuple[str, ...], threshold: float | None, hybrid: bool
                    ) -> dict[str, Any]:
    return {"top_k": top_k, "where": _pairs(where, "--where") or None, "threshold": threshold, "hybrid": hybrid}


SEARCH_OPTIONS = [
    click.option("--top-k", type=click.IntRange(1, 100), help="Passages to retrieve ([plugins.rag] top_k)."),
    click.option("--where", multiple=True, metavar="KEY=VALUE", help="Keep passages whose metadata has this value."),
    click.option("--threshold", type=float, help="Least cosine similarity ([plugins.rag] score_threshold)."),
    click.option("--hybrid", is_flag=True, help="Fuse keyword (BM25) and vector rankings."),
    click.option("--json", "as_json", is_flag=True, help="Print JSON."),
]


def _with_search_options(command: Any) -> Any:
    for option in reversed(SEARCH_OPTIONS):
        command = option(command)
    return command


@rag.command()
@click.argument("collection")
@click.argument("question")
@click.option("--model", metavar="MODEL", help="The model that answers ([plugins.rag] answer_model).")
@click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True)
@_with_search_options
@STORE
def query(collection: str, question: str, model: str | None, max_tokens: int, top_k: int | None,
          where: tuple[str, ...], threshold: float | None, hybrid: bool, as_json: bool, store: str | None) -> None:
    """Answer QUESTION from COLLECTION's documents, with the sources it used."""
    from enigma import SamplingParams
    from enigma.errors import EnigmaError
    from enigma_rag.collection import Collection

    try:
        answer = Collection(collection, store=store, model=model, create=False).query(
            question, sampling=SamplingParams(max_tokens=max_tokens, temperature=0),
            **_search_options(top_k, where, threshold, hybrid))
    except EnigmaError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps({"text": answer.text, "sources": [s.as_json() for s in answer.sources]}, indent=2))
        return
    click.echo(answer.text)
    if answer.sources:
        click.echo("\nSources:")
        for number, source in enumerate(answer.sources, 1):
            click.echo(f"  [{number}] {source.label()} (score {source.score:.3f})")
    else:
        click.echo(f"\n(no passage of {collection!r} scored above the threshold)")


@rag.command()
@click.argument("collection")
@click.argument("text")
@_with_search_options
@STORE
def search(collection: str, text: str, top_k: int | None, where: tuple[str, ...], threshold: float | None,
           hybrid: bool, as_json: bool, store: str | None) -> None:
    """Show the passages of COLLECTION most relevant to TEXT (no model answers)."""
    from enigma.errors import EnigmaError
    from enigma_rag.answers import Source
    from enigma_rag.collection import Collection

    try:
        hits = Collection(collection, store=store, create=False).search(
            text, **_search_options(top_k, where, threshold, hybrid))
    except EnigmaError as exc:
        _fail(exc)
    sources = [Source.from_hit(hit) for hit in hits]
    if as_json:
        click.echo(json.dumps([source.as_json() for source in sources], indent=2))
        return
    for number, source in enumerate(sources, 1):
        click.echo(f"[{number}] {source.score:.3f}  {source.label()}")
        click.echo("    " + " ".join(source.text.split())[:300])


@rag.command("list")
@STORE
def list_(store: str | None) -> None:
    """List the collections."""
    from enigma.errors import EnigmaError
    from enigma_rag.collection import Collection, list_collections

    try:
        names = list_collections(store)
        rows = [(name, Collection(name, store=store, create=False)) for name in names]
    except EnigmaError as exc:
        _fail(exc)
    if not rows:
        click.echo("no collections; make one with: enigma rag add NAME FILES...")
        return
    click.echo(f"{'NAME':<24} {'DOCUMENTS':>9} {'PASSAGES':>9}  EMBEDDING MODEL")
    for name, collection in rows:
        click.echo(f"{name:<24} {collection.count():>9} {collection.retriever.store.chunk_count():>9}  "
                   f"{collection.retriever.info.embedding_model}")


@rag.command()
@click.argument("collection")
@STORE
def show(collection: str, store: str | None) -> None:
    """Show COLLECTION's embedding model and documents."""
    from enigma.errors import EnigmaError
    from enigma_rag.collection import Collection

    try:
        target = Collection(collection, store=store, create=False)
    except EnigmaError as exc:
        _fail(exc)
    info = target.retriever.info
    click.echo(f"collection       {collection}")
    click.echo(f"embedding model  {info.embedding_model} ({info.dimensions} dimensions)")
    click.echo(f"passages         {target.retriever.store.chunk_count()} of at most {target.retriever.max_tokens} "
               f"tokens, {target.retriever.overlap} overlapping")
    for document in target.documents():
        click.echo(f"  {document.chunks:>6}  {document.source}")


@rag.command()
@click.argument("collection")
@click.argument("sources", nargs=-1)
@STORE
def rm(collection: str, sources: tuple[str, ...], store: str | None) -> None:
    """Delete COLLECTION, or only the documents SOURCES (paths as added) from it."""
    from enigma.errors import EnigmaError
    from enigma_rag.collection import Collection

    try:
        target = Collection(collection, store=store, create=False)
        if sources:
            removed = target.delete(list(sources))
            click.echo(f"removed {removed} of {len(sources)} documents from {collection}")
            if removed < len(sources):
                sys.exit(1)
            return
        target.drop()
    except EnigmaError as exc:
        _fail(exc)
    click.echo(f"deleted collection {collection}")
