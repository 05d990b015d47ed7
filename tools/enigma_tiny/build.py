"""Rebuild enigma-tiny from the Python documentation, on a CPU, in about half an hour.

    python tools/enigma_tiny/build.py            # writes plugins/tiny/src/enigma_tiny/model/

Steps: find the CPython 3.11 documentation sources (Debian's ``python3.11-doc``
package: installed at /usr/share/doc/python3.11/html/_sources, or fetched with
``apt-get download python3.11-doc`` and unpacked with ``dpkg-deb``), turn them
into plain prose and question/answer chats (``corpus.py``), train a 4096-token byte-level BPE on it,
pre-train a 5.4M-parameter Llama with enigma's ``sft`` trainer, and copy the
final Hugging Face folder into the enigma-tiny package.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))

import corpus  # noqa: E402

DOCS_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
DEB_SOURCES = Path("usr/share/doc/python3.11/html/_sources")
DEST = ROOT / "plugins" / "tiny" / "src" / "enigma_tiny" / "model"
SAMPLING = {"temperature": 0.6, "top_p": 0.9}
SHIPPED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")

MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 6,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32, "hidden_act": "silu",
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "initializer_range": 0.02,
    "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
    "bos_token_id": None, "eos_token_id": 0, "pad_token_id": 0, "torch_dtype": "float32",
}


def find_docs(work: Path, given: Path | None) -> Path:
    if given is not None:
        return given
    if DOCS_SOURCES.is_dir():
        return DOCS_SOURCES
    unpacked = work / "python3.11-doc"
    if not (unpacked / DEB_SOURCES).is_dir():
        print("fetching Debian's python3.11-doc package (apt-get download)...", flush=True)
        subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=work, check=True)
        deb = max(work.glob("python3.11-doc_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
    return unpacked / DEB_SOURCES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=Path, help="the documentation's _sources folder (found or fetched if omitted)")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "enigma-tiny")
    parser.add_argument("--dest", type=Path, default=DEST)
    parser.add_argument("--steps", type=int, default=800)
    args = parser.parse_args()

    from enigma.training import TrainConfig, train
    from enigma.training.tokenizer import train_tokenizer

    started = time.perf_counter()
    work = args.work.resolve()
    if (work / "run").exists():
        shutil.rmtree(work / "run")
    work.mkdir(parents=True, exist_ok=True)
    sources = find_docs(work, args.docs)
    text_dir = work / "corpus"
    shutil.rmtree(text_dir, ignore_errors=True)
    if corpus.main(sources, text_dir):
        return 1
    train_tokenizer([text_dir], work / "tokenizer", vocab_size=MODEL_CONFIG["vocab_size"], model_max_length=512)
    (work / "config.json").write_text(json.dumps(MODEL_CONFIG, indent=2))
    config = TrainConfig(
        data=[str(text_dir)], model=str(work / "config.json"), tokenizer=str(work / "tokenizer"),
        out=str(work / "run"), seq_len=512, batch_size=8, max_steps=args.steps, lr=1.5e-3, warmup_steps=50,
        min_lr_ratio=0.1, weight_decay=0.1, eval_interval=200, eval_batches=16, save_interval=100,
        val_fraction=0.02, seed=0, threads=2,
    )

    def show(event) -> None:
        if event.event == "step":
            print(f"step {event.step}/{event.total_steps} loss {event.loss:.3f} lr {event.lr:.2e} "
                  f"{event.tokens_per_s:.0f} tok/s eta {event.eta_s / 60:.1f} min", flush=True)
        elif event.event == "eval":
            print(f"step {event.step} validation loss {event.val_loss:.3f} "
                  f"perplexity {event.val_perplexity:.1f}", flush=True)
        elif event.message:
            print(event.message, flush=True)

    out = train(config, progress=show)
    record = json.loads((out / "enigma_training.json").read_text())
    args.dest.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED:
        shutil.copyfile(out / name, args.dest / name)
    generation = json.loads((args.dest / "generation_config.json").read_text())
    generation.update(SAMPLING)  # what `enigma run` uses unless told otherwise
    (args.dest / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    minutes = (time.perf_counter() - started) / 60
    summary = {"corpus": "CPython 3.11 documentation (Debian python3.11-doc): prose, and Q&A chats drawn from it",
               "corpus_license": "PSF-2.0 (text), 0BSD (examples)",
               "corpus_tokens": None, "steps": record["steps"], "tokens_seen": record["tokens"],
               "validation_loss": round(record["val_loss"], 4),
               "validation_perplexity": round(record["val_perplexity"], 2), "build_minutes": round(minutes, 1)}
    from enigma.tokenizer import Tokenizer

    tokenizer = Tokenizer(args.dest)
    summary["corpus_tokens"] = sum(len(tokenizer.encode(p.read_text(encoding="utf-8")))
                                   for p in sorted(text_dir.glob("*.txt")))
    (args.dest / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
