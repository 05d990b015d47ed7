"""``enigma eval`` as a user runs it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_models import CORPUS, make_model


def test_eval_multiple_choice_and_perplexity(enigma, tmp_path):
    from enigma import LLM
    from enigma.evaluation import evaluate_multiple_choice, perplexity, read_multiple_choice

    folder = make_model(tmp_path / "model", "llama-gqa")
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"query": f"Item {i}: the answer is", "choices": ["yes", "no", "maybe"],
                                        "label": i % 3}) + "\n" for i in range(9)))
    done = enigma("eval", str(folder), "--task", "mc", "--data", str(data), "--limit", "6",
                  "--output", str(tmp_path / "mc.json"))
    assert done.returncode == 0, done.stderr
    expected = evaluate_multiple_choice(LLM(folder), read_multiple_choice(data, limit=6))
    written = json.loads((tmp_path / "mc.json").read_text())
    assert (written["acc"], written["acc_norm"], written["count"]) == (expected.acc, expected.acc_norm, 6)
    assert "acc_norm" in done.stdout

    (tmp_path / "notes.txt").write_text(CORPUS)
    ppl = enigma("eval", str(folder), "--task", "perplexity", "--data", str(tmp_path / "notes.txt"),
                 "--window", "64", "--stride", "32", "--output", str(tmp_path / "ppl.json"))
    assert ppl.returncode == 0, ppl.stderr
    expected_ppl = perplexity(LLM(folder), [CORPUS], window=64, stride=32)
    assert json.loads((tmp_path / "ppl.json").read_text())["perplexity"] == expected_ppl.perplexity

    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"prompt": "Lists are", "reference": "mutable sequences"}) + "\n")
    generated = enigma("eval", str(folder), "--task", "generate", "--data", str(gen), "--max-tokens", "6",
                       "--output", str(tmp_path / "gen.json"))
    assert generated.returncode == 0, generated.stderr
    scores = json.loads((tmp_path / "gen.json").read_text())
    assert {"bleu", "chrf", "rouge1", "rougeLsum", "exact_match", "f1"} <= set(scores) and scores["count"] == 1

    bad = enigma("eval", str(folder), "--task", "hellaswag", "--data", str(data))
    assert bad.returncode == 1 and "line 1: not a hellaswag record" in bad.stderr


def test_eval_fewshot_writes_each_question(enigma, tmp_path):
    from enigma import LLM
    from enigma.evaluation import evaluate_multiple_choice, read_multiple_choice
    from enigma.evaluation.multiple_choice import with_fewshot

    folder = make_model(tmp_path / "model", "llama-gqa")
    data, train = tmp_path / "mc.jsonl", tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"query": f"Item {i}: the answer is", "choices": ["yes", "no", "maybe"],
                                        "label": i % 3}) + "\n" for i in range(8)))
    train.write_text("".join(json.dumps({"query": f"Train {i}:", "choices": ["a", "b"], "label": 1}) + "\n"
                             for i in range(4)))
    done = enigma("eval", str(folder), "--task", "mc", "--data", str(data), "--limit", "5", "--num-fewshot", "2",
                  "--output", str(tmp_path / "mc.json"))
    assert done.returncode == 0, done.stderr
    written = json.loads((tmp_path / "mc.json").read_text())
    everything = read_multiple_choice(data)
    expected = evaluate_multiple_choice(LLM(folder), with_fewshot(everything[:5], 2, pool=everything,
                                                                  same_split=True))
    assert (written["acc"], written["acc_norm"], written["num_fewshot"]) == (expected.acc, expected.acc_norm, 2)
    assert [s["loglikelihoods"] for s in written["samples"]] == [list(x) for x in expected.loglikelihoods]
    assert [s["gold"] for s in written["samples"]] == [0, 1, 2, 0, 1]

    from_train = enigma("eval", str(folder), "--task", "mc", "--data", str(data), "--num-fewshot", "2",
                        "--fewshot-data", str(train), "--fewshot-seed", "5", "--output", str(tmp_path / "t.json"))
    assert from_train.returncode == 0, from_train.stderr
    too_many = enigma("eval", str(folder), "--task", "mc", "--data", str(data), "--num-fewshot", "5",
                      "--fewshot-data", str(train))
    assert too_many.returncode == 1 and "the few-shot data has only 4" in too_many.stderr
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"prompt": f"Q{i}:", "reference": f"A{i}"}) + "\n" for i in range(3)))
    generated = enigma("eval", str(folder), "--task", "generate", "--data", str(gen), "--num-fewshot", "1",
                       "--max-tokens", "2", "--output", str(tmp_path / "gen.json"))
    assert generated.returncode == 0, generated.stderr
    prompts = [s["prompt"] for s in json.loads((tmp_path / "gen.json").read_text())["samples"]]
    assert all(p.count("\n\n") == 1 and p.endswith(f"Q{i}:") for i, p in enumerate(prompts))
