"""Distil enigma-tiny-draft, enigma-tiny's speculative-decoding draft, from enigma-tiny's own outputs.

    python tools/enigma_tiny/build_draft.py       # writes plugins/tiny/src/enigma_tiny/draft/

Sequence-level distillation (Kim & Rush, 2016): enigma-tiny continues
passages of the Python documentation and answers the documentation's
questions, greedily for half of them and with its recommended sampling
(temperature 0.6, top-p 0.9) for the other half — what it is asked in use;
a two-layer Llama with enigma-tiny's tokenizer is then trained on those
outputs with enigma's ``sft`` trainer. The draft imitates the model it
drafts for, not the documents (it predicts enigma-tiny's next token, which is what
speculative decoding needs). The documentation comes as for enigma-tiny (``build.py``).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))

# this folder's build.py (first on sys.path), not PyPI's `build`
import build  # noqa: E402
import corpus  # noqa: E402

DEST = ROOT / "plugins" / "tiny" / "src" / "enigma_tiny" / "draft"
SHIPPED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")

DRAFT_CONFIG = {
    **build.MODEL_CONFIG,
    "hidden_size": 160, "intermediate_size": 416, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 40,
}
"""1.21M parameters, 4.84 MB in float32 (the folder stays under 5 MB); enigma-tiny's vocabulary, context
and special tokens."""


def prompts_from(text_dir: Path, tokenizer, rng: random.Random, *, texts: int, chats: int):
    """Passage openings (24-64 tokens of a paragraph) and questions from the documentation's chats."""
    paragraphs = [p for path in sorted(text_dir.glob("*.txt"))
                  for p in path.read_text(encoding="utf-8").split("\n\n") if len(p) > 200]
    openings = []
    for paragraph in rng.sample(paragraphs, texts):
        ids = tokenizer.encode(paragraph)
        openings.append(tokenizer.decode(ids[: rng.randint(24, 64)]))
    records = [json.loads(line) for line in (text_dir / "chat.jsonl").read_text(encoding="utf-8").splitlines()]
    questions = [[m for m in record["messages"] if m["role"] != "assistant"][:2]
                 for record in rng.sample(records, chats)]
    return openings, questions


def distil(llm, openings, questions, *, max_tokens: int):
    """enigma-tiny's continuations and answers: half greedy, half with its recommended sampling."""
    from enigma import SamplingParams

    def params(index: int) -> SamplingParams:
        if index % 2:
            return SamplingParams(temperature=build.SAMPLING["temperature"], top_p=build.SAMPLING["top_p"],
                                  max_tokens=max_tokens, seed=index)
        return SamplingParams(temperature=0, max_tokens=max_tokens)

    records = []
    outputs = llm.generate(openings, [params(i) for i in range(len(openings))])
    for opening, output in zip(openings, outputs):
        records.append({"text": opening + output.outputs[0].text})
    outputs = llm.chat(questions, [params(i) for i in range(len(questions))])
    for question, output in zip(questions, outputs):
        records.append({"messages": [*question, {"role": "assistant", "content": output.outputs[0].text}]})
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=Path, help="the documentation's _sources folder (found or fetched if omitted)")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "enigma-tiny-draft")
    parser.add_argument("--dest", type=Path, default=DEST)
    parser.add_argument("--texts", type=int, default=9000, help="passage openings to continue")
    parser.add_argument("--chats", type=int, default=4500, help="questions to answer")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--steps", type=int, default=2400)
    args = parser.parse_args()

    import enigma_tiny

    from enigma import LLM
    from enigma.tokenizer import Tokenizer
    from enigma.training import TrainConfig, train

    started = time.perf_counter()
    work = args.work.resolve()
    shutil.rmtree(work / "run", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    text_dir = work / "corpus"
    if not (text_dir / "chat.jsonl").is_file() and corpus.main(build.find_docs(work, args.docs), text_dir):
        return 1
    teacher = enigma_tiny.model_path()
    openings, questions = prompts_from(text_dir, Tokenizer(teacher), random.Random(0), texts=args.texts,
                                       chats=args.chats)
    print(f"distilling: {len(openings)} passages and {len(questions)} questions through enigma-tiny", flush=True)
    records = distil(LLM("enigma-tiny", max_num_seqs=64), openings, questions, max_tokens=args.max_tokens)
    data = work / "distilled.jsonl"
    with data.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    generated_minutes = (time.perf_counter() - started) / 60
    (work / "config.json").write_text(json.dumps(DRAFT_CONFIG, indent=2))
    config = TrainConfig(
        data=[str(data)], model=str(work / "config.json"), tokenizer=str(teacher), out=str(work / "run"),
        seq_len=256, batch_size=16, max_steps=args.steps, lr=3e-3, warmup_steps=50, min_lr_ratio=0.1,
        weight_decay=0.1, eval_interval=300, eval_batches=16, save_interval=300, val_fraction=0.02, seed=0,
        threads=2,
    )

    def show(event) -> None:
        if event.event == "step" and event.step % 50 == 0:
            print(f"step {event.step}/{event.total_steps} loss {event.loss:.3f} {event.tokens_per_s:.0f} tok/s "
                  f"eta {event.eta_s / 60:.1f} min", flush=True)
        elif event.event == "eval":
            print(f"step {event.step} validation loss {event.val_loss:.3f}", flush=True)

    out = train(config, progress=show)
    record = json.loads((out / "enigma_training.json").read_text())
    args.dest.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED:
        shutil.copyfile(out / name, args.dest / name)
    shutil.copyfile(teacher / "generation_config.json", args.dest / "generation_config.json")
    val_loss = record["val_loss"]
    summary = {"teacher": "enigma-tiny", "method": "sequence-level distillation on the teacher's outputs",
               "passages": len(openings), "questions": len(questions), "max_tokens": args.max_tokens,
               "distilled_tokens": sum(len(Tokenizer(teacher).encode(r.get("text") or r["messages"][-1]["content"]))
                                       for r in records),
               "steps": record["steps"], "tokens_seen": record["tokens"],
               "validation_loss": None if val_loss is None else round(val_loss, 4),
               "generation_minutes": round(generated_minutes, 1),
               "build_minutes": round((time.perf_counter() - started) / 60, 1)}
    (args.dest / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
