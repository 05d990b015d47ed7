"""HTTP: collections over ``/v1/rag`` — add documents, search, list, show, delete.

``POST /v1/rag/{collection}/documents`` takes JSON: ``{"files": [{"name":
"manual.pdf", "content": BASE64}], "documents": [{"text": "...", "source":
"note-1", "metadata": {...}}]}``; each file is reported on its own (added,
replaced, unchanged, or failed with the reason). ``POST
/v1/rag/{collection}/search`` takes ``{"query", "top_k", "threshold",
"where", "hybrid"}``. Indexing runs in a worker thread: the server keeps
answering meanwhile.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from pathlib import Path
from typing import Any

from enigma.server import APIError
from enigma.server.openai_fields import read_json

MAX_FILES = 1000


def _collection_name(request: Any) -> str:
    from enigma.retrieval import check_collection_name

    return check_collection_name(request.path_params["collection"])


def _upload_name(index: int, item: Any) -> str:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(item.get("content"), str):
        raise APIError(400, f"files[{index}] must be an object with 'name' (a file name) and 'content' (base64)",
                       param=f"files[{index}]")
    name = Path(item["name"]).name
    if not name or name in (".", ".."):
        raise APIError(400, f"files[{index}].name {item['name']!r} is not a file name", param=f"files[{index}].name")
    return name


def _add(name: str, body: dict[str, Any]) -> dict[str, Any]:
    from enigma_rag.collection import Collection, FileResult
    from enigma_rag.hook import forget_collection

    files, documents = body.get("files") or [], body.get("documents") or []
    if not isinstance(files, list) or not isinstance(documents, list) or not (files or documents):
        raise APIError(400, "send 'files' (a list of {name, content}) and/or 'documents' (a list of {text, source})",
                       param="files")
    if len(files) + len(documents) > MAX_FILES:
        raise APIError(400, f"at most {MAX_FILES} files and documents a request", param="files")
    collection = Collection(name)
    results: list[FileResult] = []
    with tempfile.TemporaryDirectory(prefix="enigma-rag-upload-") as folder:
        for index, item in enumerate(files):
            file_name = _upload_name(index, item)
            try:
                data = base64.b64decode(item["content"], validate=True)
            except (binascii.Error, ValueError):
                results.append(FileResult(file_name, "failed", error=f"{file_name}: 'content' is not valid base64"))
                continue
            path = Path(folder) / f"{index}" / file_name
            path.parent.mkdir()
            path.write_bytes(data)
            try:
                results.append(collection.add_document(path, source=file_name, metadata=item.get("metadata")))
            except Exception as exc:  # reported per file; the others go on
                message = str(exc).replace(str(path), file_name)
                results.append(FileResult(file_name, "failed", error=message))
    for index, item in enumerate(documents):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not item["text"].strip():
            raise APIError(400, f"documents[{index}] must be an object with a non-empty 'text'",
                           param=f"documents[{index}]")
        source = str(item.get("source") or item.get("id") or f"document-{index}")
        results.append(collection.add_text(item["text"], source=source, metadata=item.get("metadata")))
    forget_collection(name)
    return {"collection": name, "documents": collection.count(), "files": [
        {"source": r.source, "status": r.status, "chunks": r.chunks, **({"error": r.error} if r.error else {})}
        for r in results]}


def _search(name: str, body: dict[str, Any]) -> dict[str, Any]:
    from enigma_rag.answers import Source
    from enigma_rag.hook import open_collection, parse_options

    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise APIError(400, "'query' must be a non-empty string", param="query")
    options = parse_options({"collection": name, **{k: v for k, v in body.items() if k != "query"}})
    collection = open_collection(name)
    hits = collection.search(query, top_k=options.get("top_k"), where=options.get("where"),
                             threshold=options.get("threshold"), hybrid=options.get("hybrid", False))
    return {"object": "list", "collection": name, "data": [Source.from_hit(hit).as_json() for hit in hits]}


def _describe(name: str) -> dict[str, Any]:
    from enigma_rag.hook import open_collection

    collection = open_collection(name)
    info = collection.retriever.info
    return {"collection": name, "embedding_model": info.embedding_model, "dimensions": info.dimensions,
            "chunks": collection.retriever.store.chunk_count(), "documents": [
                {"source": d.source, "chunks": d.chunks, "content_hash": d.content_hash, "added": d.added}
                for d in collection.documents()]}


class RAGTransport:
    """``/v1/rag`` routes."""

    def routes(self, context: Any) -> list[Any]:
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def collections(request: Any) -> Any:
            from enigma_rag.collection import list_collections

            return JSONResponse({"object": "list", "data": [{"collection": name}
                                                             for name in await run_in_threadpool(list_collections)]})

        async def show(request: Any) -> Any:
            return JSONResponse(await run_in_threadpool(_describe, _collection_name(request)))

        async def add(request: Any) -> Any:
            name = _collection_name(request)
            return JSONResponse(await run_in_threadpool(_add, name, await read_json(request)))

        async def search(request: Any) -> Any:
            name = _collection_name(request)
            return JSONResponse(await run_in_threadpool(_search, name, await read_json(request)))

        async def delete(request: Any) -> Any:
            from enigma_rag.collection import Collection
            from enigma_rag.hook import forget_collection

            name = _collection_name(request)
            collection = await run_in_threadpool(Collection, name, create=False)
            await run_in_threadpool(collection.drop)
            forget_collection(name)
            return JSONResponse({"collection": name, "deleted": True})

        return [Route("/v1/rag", collections, methods=["GET"]),
                Route("/v1/rag/{collection}", show, methods=["GET"]),
                Route("/v1/rag/{collection}", delete, methods=["DELETE"]),
                Route("/v1/rag/{collection}/documents", add, methods=["POST"]),
                Route("/v1/rag/{collection}/search", search, methods=["POST"])]
