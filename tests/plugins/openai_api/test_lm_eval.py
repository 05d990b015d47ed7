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
from pathlib import Path

import pytest
from lm_eval_tasks import write_multiple_choice_task
from serving import ENIGMA, launch, stop
from tiny_models import make_model

from enigma import LLM

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


def hellaswag_rows(count: int) -> list[dict]:
    """Records in HellaSwag's shape, brackets and all (its preprocessing removes them)."""
    rows = []
    for index in range(count):
        endings = [f"{WORDS[(index + k) % len(WORDS)]} [header] then " + "more " * ((index + k) % 3) + "words."
                   for k in range(4)]
        rows.append({"activity_label": f"Python {WORDS[index % len(WORDS)]}", "ctx_a": f"Someone writes code {index}.",
                     "ctx_b": "they run it and", "endings": endings, "label": str(index % 4)})
    return rows


def run_lm_eval(base, task_dir, task, **options):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model="local-completions",
        model_args=f"model=tiny,base_url={base}/v1/completions,num_concurrent=1,max_retries=1,"
                   "tokenized_requests=True",
        tasks=[task], task_manager=TaskManager(include_path=str(task_dir)), batch_size=1, **options)
    return (results["results"][task], results["samples"][task]) if options.get("log_samples") else \
        results["results"][task]


@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


def test_lm_eval_multiple_choice_scores_equal_enigmas(lone_server, tmp_path, offline_hf):
    from enigma.evaluation import evaluate_multiple_choice, read_multiple_choice

    base, folder = lone_server
    rows = items(24)
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_multiple_choice_task(tmp_path, "enigma_mc", data, text_field="question")
    got = run_lm_eval(base, tmp_path, "enigma_mc")
    ours = evaluate_multiple_choice(LLM(folder), read_multiple_choice(data, "mc"), add_special_tokens=False)
    print(f"lm-eval: acc {got['acc,none']:.4f}, acc_norm {got['acc_norm,none']:.4f}; enigma: {ours}")
    assert got["acc,none"] == pytest.approx(ours.acc)
    assert got["acc_norm,none"] == pytest.approx(ours.acc_norm)
    # the bug this guards against gave every choice 0 and so acc = the share of gold answers at index 0
    assert (got["acc,none"], got["acc_norm,none"]) != (0.25, 0.25)


def test_hellaswag_as_lm_eval_prepares_it(lone_server, tmp_path, offline_hf):
    """lm-eval's own hellaswag task (its YAML and preprocessing) on a local file, against enigma's reading."""
    import shutil

    import lm_eval.tasks.hellaswag as hellaswag

    from enigma.evaluation import evaluate_multiple_choice, read_multiple_choice

    base, folder = lone_server
    data = tmp_path / "hellaswag.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in hellaswag_rows(16)))
    source = Path(hellaswag.__path__[0])
    shutil.copy(source / "utils.py", tmp_path / "utils.py")
    config = (source / "hellaswag.yaml").read_text()
    local = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {data}\n    validation: {data}"
    config = config.replace("task: hellaswag", "task: local_hellaswag").replace("dataset_path: Rowan/hellaswag", local)
    (tmp_path / "local_hellaswag.yaml").write_text(config)
    got = run_lm_eval(base, tmp_path, "local_hellaswag")
    ours = evaluate_multiple_choice(LLM(folder), read_multiple_choice(data, "hellaswag"), task="hellaswag",
                                    add_special_tokens=False)  # local-completions tokenizes without BOS
    assert ours.count == 16
    assert got["acc,none"] == pytest.approx(ours.acc)
    assert got["acc_norm,none"] == pytest.approx(ours.acc_norm)


def test_enigma_eval_against_a_server_equals_in_process(lone_server, tmp_path):
    from enigma.evaluation import evaluate_multiple_choice, perplexity, read_multiple_choice
    from enigma.evaluation.remote import RemoteModel

    base, folder = lone_server
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in items(8)))
    remote, local = RemoteModel(base, "tiny"), LLM(folder)
    questions = read_multiple_choice(data)
    served, in_process = evaluate_multiple_choice(remote, questions), evaluate_multiple_choice(local, questions)
    assert (served.acc, served.acc_norm, served.predictions, served.predictions_norm) == (
        in_process.acc, in_process.acc_norm, in_process.predictions, in_process.predictions_norm)
    for theirs, ours in zip(served.loglikelihoods, in_process.loglikelihoods):
        assert theirs == pytest.approx(ours, rel=1e-5, abs=1e-5)
    text = " ".join(row["question"] for row in items(12))
    assert perplexity(remote, [text], window=32, stride=16).perplexity == pytest.approx(
        perplexity(local, [text], window=32, stride=16).perplexity, rel=1e-5)


def test_lm_eval_fewshot_prompts_and_scores_equal_enigmas(lone_server, tmp_path, offline_hf):
    """With --num-fewshot 3 and --limit, lm-eval's prompts (logged per sample) are enigma's, character for
    character, and so are the scores."""
    from enigma.evaluation import evaluate_multiple_choice, read_multiple_choice
    from enigma.evaluation.multiple_choice import with_fewshot

    base, folder = lone_server
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in items(20)))
    write_multiple_choice_task(tmp_path, "enigma_fewshot", data, text_field="question", fewshot_from_test=True)
    got, samples = run_lm_eval(base, tmp_path, "enigma_fewshot", num_fewshot=3, limit=12, log_samples=True)
    everything = read_multiple_choice(data, "mc")
    questions = with_fewshot(everything[:12], 3, pool=everything, same_split=True)
    theirs = {sample["doc_id"]: sample["arguments"] for sample in samples}
    for index, question in enumerate(questions):
        contexts = [argument[0] for argument in theirs[index]]
        assert contexts == [question.context] * len(question.choices), index
    assert questions[0].context.count("\n\n") == 3
    ours = evaluate_multiple_choice(LLM(folder), questions, add_special_tokens=False)
    assert got["acc,none"] == pytest.approx(ours.acc)
    assert got["acc_norm,none"] == pytest.approx(ours.acc_norm)
