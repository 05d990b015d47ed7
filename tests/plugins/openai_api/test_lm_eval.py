"""lm-evaluation-harness itself, against `enigma serve`: its multiple-choice scores equal enigma's own.

lm-eval's ``local-completions`` model sends token ids with ``echo`` and
``logprobs`` and reads one logprob per prompt token; its remote tokenizer
uses ``/tokenizer_info``, ``/tokenize`` and ``/detokenize``. The expected
acc and acc_norm are computed here from the engine's prompt logprobs with
lm-eval's own rules (continuation = " " + choice, tokenized as a suffix of
the whole; acc_norm divides by the choice's length in characters).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from serving import ENIGMA, launch, stop
from tiny_models import make_model

from enigma import LLM, SamplingParams

pytestmark = pytest.mark.slow

WORDS = ["list", "tuple", "dict", "set", "generator", "iterator", "module", "class", "function", "string"]


def items(count: int) -> list[dict]:
    rows = []
    for index in range(count):
        word = WORDS[index % len(WORDS)]
        choices = [WORDS[(index + k) % len(WORDS)] * (1 + (index + k) % 3) for k in range(4)]
        rows.append({"question": f"Question {index}: which Python type is a {word}?", "choices": choices,
                     "label": index % 4})
    return rows


@pytest.fixture(scope="module")
def lone_server(tmp_path_factory):
    """A server with one model, as lm-eval's remote tokenizer expects (its calls name no model)."""
    home = tmp_path_factory.mktemp("lm-eval-home")
    env = {**os.environ, "ENIGMA_HOME": str(home)}
    folder = make_model(tmp_path_factory.mktemp("lm-eval-model"), "llama-gqa", template="chatml")
    subprocess.run([str(ENIGMA), "pull", str(folder), "--name", "tiny"], env=env, check=True, capture_output=True)
    process, base = launch(env, "tiny", log_path=home / "server.log")
    yield base, folder
    stop(process)


def expected_scores(folder, rows) -> dict[str, float]:
    llm = LLM(folder)
    encode = llm.tokenizer.encode
    correct = correct_norm = 0
    for row in rows:
        context = row["question"]
        scores = []
        for choice in row["choices"]:
            whole = encode(context + " " + choice, add_special_tokens=False)
            start = len(encode(context, add_special_tokens=False))
            out = llm.generate([whole], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0))[0]
            scores.append(sum(out.prompt_logprobs[p][whole[p]].logprob for p in range(start, len(whole))))
        best = max(range(4), key=lambda i: scores[i])
        best_norm = max(range(4), key=lambda i: scores[i] / len(row["choices"][i]))
        correct += best == row["label"]
        correct_norm += best_norm == row["label"]
    return {"acc": correct / len(rows), "acc_norm": correct_norm / len(rows)}


def test_lm_eval_multiple_choice_scores_equal_enigmas(lone_server, tmp_path, monkeypatch):
    base, folder = lone_server
    rows = items(24)
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "enigma_mc.yaml").write_text(f"""task: enigma_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model="local-completions",
        model_args=f"model=tiny,base_url={base}/v1/completions,num_concurrent=1,max_retries=1,"
                   "tokenized_requests=True",
        tasks=["enigma_mc"], task_manager=TaskManager(include_path=str(tmp_path)), batch_size=1)
    got = results["results"]["enigma_mc"]
    expected = expected_scores(folder, rows)
    assert got["acc,none"] == pytest.approx(expected["acc"])
    assert got["acc_norm,none"] == pytest.approx(expected["acc_norm"])
    print(f"lm-eval: acc {got['acc,none']:.4f}, acc_norm {got['acc_norm,none']:.4f}; enigma: {expected}")
    # the bug this guards against gave every choice 0 and so acc = the share of gold answers at index 0
    assert (got["acc,none"], got["acc_norm,none"]) != (0.25, 0.25)
