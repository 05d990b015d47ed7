"""enigma.evaluation against oracles: transformers for perplexity, lm-eval's rules for choices."""

from __future__ import annotations

import json
import math

import pytest
import torch

from enigma import LLM
from enigma.errors import BadRequestError
from enigma.evaluation import evaluate_multiple_choice, perplexity, read_multiple_choice
from enigma.evaluation.perplexity import windows

TEXT = ("Paged attention stores keys and values in blocks, and continuous batching lets new requests join "
        "while others decode. A list is mutable while a tuple is not. ") * 3


@pytest.fixture(scope="module")
def folder(tiny_model):
    return tiny_model("llama-gqa")


def transformers_perplexity(folder, text, window, stride):
    from transformers import AutoModelForCausalLM

    from enigma.tokenizer import Tokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    ids = Tokenizer(folder).encode(text)
    nll, count = 0.0, 0
    previous_end = 0
    for begin in range(0, len(ids), stride):  # Hugging Face's "perplexity of fixed-length models"
        end = min(begin + window, len(ids))
        target_len = end - previous_end
        chunk = torch.tensor([ids[begin:end]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(chunk).logits[0].double(), dim=-1)
        for position in range(max(1, end - begin - target_len), end - begin):
            nll -= float(logprobs[position - 1, ids[begin + position]])
            count += 1
        previous_end = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize(("window", "stride"), [(32, 16), (48, 48), (64, 7)])
def test_perplexity_equals_transformers(folder, window, stride):
    result = perplexity(LLM(folder), [TEXT], window=window, stride=stride)
    expected, count = transformers_perplexity(folder, TEXT, window, stride)
    assert result.tokens == count
    assert result.perplexity == pytest.approx(expected, rel=1e-4)
    assert result.bytes == len(TEXT.encode()) and result.bits_per_byte == pytest.approx(
        result.nll / math.log(2) / result.bytes)


def test_windows_score_every_token_once():
    for length, window, stride in ((100, 32, 16), (10, 32, 16), (50, 20, 3)):
        scored = [p for begin, end, first in windows(length, window, stride) for p in range(first, end)]
        assert scored == list(range(1, length))
    # stride == window: each window's first token has nothing before it in the window (as in the recipe)
    scored = [p for begin, end, first in windows(48, 16, 16) for p in range(first, end)]
    assert scored == [p for p in range(1, 48) if p % 16]


def test_perplexity_errors(folder):
    with pytest.raises(BadRequestError, match="need 0 < stride <= window"):
        perplexity(LLM(folder), [TEXT], window=16, stride=32)
    with pytest.raises(BadRequestError, match="no text"):
        perplexity(LLM(folder), [""])


def test_multiple_choice_shapes_and_errors(folder, tmp_path):
    arc = tmp_path / "arc.jsonl"
    arc.write_text(json.dumps({"question": "Which holds pairs?", "answerKey": "B",
                               "choices": {"text": ["a list", "a dict", "a set"], "label": ["A", "B", "C"]}}) + "\n")
    question = read_multiple_choice(arc, "arc")[0]
    assert (question.context, question.choices, question.gold) == ("Question: Which holds pairs?\nAnswer:",
                                                                   ("a list", "a dict", "a set"), 1)
    mmlu = tmp_path / "mmlu.jsonl"
    mmlu.write_text(json.dumps({"question": " 2 + 2 = ? ", "choices": ["3", "4", "5", "6"], "answer": 1,
                                "subject": "elementary_mathematics"}) + "\n")
    question = read_multiple_choice(mmlu, "mmlu")[0]
    assert question.context == ("The following are multiple choice questions (with answers) about elementary "
                                "mathematics.\n\n2 + 2 = ?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    assert question.choices == ("A", "B", "C", "D")
    result = evaluate_multiple_choice(LLM(folder), read_multiple_choice(arc, "arc") * 3)
    assert result.count == 3 and result.acc in (0.0, 1.0) and len(result.predictions) == 3
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"question": "q", "choices": ["a"], "label": 3}) + "\n")
    with pytest.raises(BadRequestError, match=r"broken.jsonl, line 1: the gold answer 3 is not one of its 1"):
        read_multiple_choice(broken)
    with pytest.raises(BadRequestError, match=r"line 1: not a hellaswag record"):
        read_multiple_choice(arc, "hellaswag")


def test_prompt_logprobs_from_a_start_reuse_the_cached_context(folder):
    from enigma import SamplingParams

    llm = LLM(folder)
    ids = llm.tokenizer.encode(TEXT)[:70]
    full = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0))[0].prompt_logprobs
    llm.generate([ids[:50]], SamplingParams(max_tokens=1))  # the context's blocks into the prefix cache
    hits = llm.engine.cache.prefix_hits
    scored = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0, prompt_logprobs_start=50))[0]
    assert llm.engine.cache.prefix_hits > hits  # the context came from the cache
    assert scored.prompt_logprobs[:50] == [None] * 50
    for position in range(50, 70):
        assert scored.prompt_logprobs[position][ids[position]].logprob == pytest.approx(
            full[position][ids[position]].logprob, abs=1e-4)


PAIRS = [("the cat sat on the mat", ["the cat is on the mat", "a cat sat on a mat"]),
         ("paged attention stores keys in blocks", ["paged attention keeps keys and values in blocks"]),
         ("lists are mutable", ["a list is mutable", "lists can change"]),
         ("nothing in common here", ["completely different words"])]


def test_text_metrics_equal_the_reference_scorers():
    import sacrebleu
    from rouge_score import rouge_scorer

    from enigma.evaluation import text_metrics

    predictions = [p for p, _ in PAIRS]
    references = [refs for _, refs in PAIRS]
    streams = [[refs[0] for refs in references], [refs[-1] for refs in references]]
    assert text_metrics.bleu(predictions, references) == sacrebleu.corpus_bleu(predictions, streams).score
    assert text_metrics.chrf(predictions, references) == sacrebleu.corpus_chrf(predictions, streams).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    ours = text_metrics.rouge(predictions, references)
    for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        expected = sum(scorer.score_multi(refs, p)[name].fmeasure for p, refs in PAIRS) / len(PAIRS)
        assert ours[name] == pytest.approx(expected)
    assert 0 < ours["rouge1"] < 1


def test_exact_match_and_f1_are_squads():
    from enigma.evaluation import text_metrics

    assert text_metrics.normalize_answer("The  Cat, sat!") == "cat sat"
    assert text_metrics.exact_match(["The cat.", "a dog"], [["cat"], ["the cat"]]) == 0.5
    # SQuAD: "the big cat" vs "cat" -> tokens [big, cat] vs [cat]: precision 1/2, recall 1, F1 2/3
    assert text_metrics.token_f1(["the big cat"], [["cat", "dog"]]) == pytest.approx(2 / 3)


def test_generation_task_scores_the_engines_answers(folder, tmp_path):
    from enigma import SamplingParams
    from enigma.evaluation import evaluate_generation, read_generation

    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "references": refs}) + "\n" for p, refs in PAIRS))
    llm = LLM(folder)
    result = evaluate_generation(llm, read_generation(data), max_tokens=8)
    expected = [out.outputs[0].text.strip() for out in llm.generate(
        [p for p, _ in PAIRS], SamplingParams(max_tokens=8, temperature=0, stop=["\n\n"]))]
    assert list(result.predictions) == expected
    from enigma.evaluation import text_metrics

    assert result.metrics["bleu"] == text_metrics.bleu(expected, [refs for _, refs in PAIRS])
    assert set(result.metrics) == {"bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum", "exact_match", "f1"}
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(BadRequestError, match="bad.jsonl, line 1: not a generation record"):
        read_generation(tmp_path / "bad.jsonl")


def test_the_seeds_names(folder, tmp_path):
    from enigma.evaluation import BenchmarkRunner, Evaluator

    llm = LLM(folder)
    scores = Evaluator(llm).evaluate_all([TEXT], prompts=["Lists are"], references=["mutable"], window=32,
                                         stride=16)
    assert scores["perplexity"] == perplexity(llm, [TEXT], window=32, stride=16).perplexity
    assert {"bleu", "rouge1", "f1"} <= set(scores)
    data = tmp_path / "hs.jsonl"
    data.write_text(json.dumps({"activity_label": "Coding", "ctx_a": "She opens a file.", "ctx_b": "then she",
                                "endings": ["reads it.", "sings.", "flies away.", "closes it."], "label": "0"}) + "\n")
    result = BenchmarkRunner(llm).run_hellaswag(data)
    assert result.task == "hellaswag" and result.count == 1
    mmlu = tmp_path / "mmlu.jsonl"
    mmlu.write_text("".join(json.dumps({"question": f"{i} + 1 = ?", "choices": ["1", "2", "3", "4"], "answer": 1})
                            + "\n" for i in range(7)))
    five_shot = BenchmarkRunner(llm).run_mmlu(mmlu, num_fewshot=5, limit=2)
    zero_shot = BenchmarkRunner(llm).run_mmlu(mmlu, limit=2)
    assert five_shot.count == 2 and five_shot.loglikelihoods != zero_shot.loglikelihoods


def test_fewshot_draws_equal_lm_evals_sampler():
    """The same examples, in the same order, as lm-eval's default ContextSampler seeded 1234 gives for
    each document in turn — with the document left out when the pool is its own split."""
    from lm_eval.api.samplers import ContextSampler

    from enigma.evaluation.fewshot import sample_fewshot

    docs = [{"question": f"q{i}", "label": i % 3} for i in range(12)] + [{"question": "q3", "label": 0}]
    theirs = ContextSampler(docs, rnd=1234)
    expected = [theirs.sample(3, eval_doc=doc) for doc in docs[:8]]
    assert sample_fewshot(docs[:8], 3, pool=docs, same_split=True) == expected
    whole = ContextSampler(docs, rnd=1234)  # docs[3] has a duplicate: both copies leave its draws
    assert sample_fewshot(docs, 3) == [whole.sample(3, eval_doc=doc) for doc in docs]
    train = [{"question": f"t{i}", "label": 1} for i in range(5)]
    other = ContextSampler(train, rnd=7)
    assert sample_fewshot(docs[:4], 2, pool=train, seed=7) == [other.sample(2) for _ in range(4)]
    with pytest.raises(BadRequestError, match="6 few-shot examples were asked for but the few-shot data has only 5"):
        sample_fewshot(docs, 6, pool=train)


def test_fewshot_prompts(folder, tmp_path):
    from enigma.evaluation.generation import GenerationExample
    from enigma.evaluation.generation import with_fewshot as generation_fewshot
    from enigma.evaluation.multiple_choice import with_fewshot

    mmlu = tmp_path / "mmlu.jsonl"
    mmlu.write_text("".join(json.dumps({"question": f"{i} + 1 = ?", "choices": [str(i), str(i + 1), "0", "9"],
                                        "answer": 1, "subject": "arithmetic"}) + "\n" for i in range(4)))
    questions = with_fewshot(read_multiple_choice(mmlu, "mmlu"), 2)
    head = "The following are multiple choice questions (with answers) about arithmetic.\n\n"
    assert questions[0].context.startswith(head) and questions[0].context.count(head) == 1
    assert questions[0].context.endswith("\n\n0 + 1 = ?\nA. 0\nB. 1\nC. 0\nD. 9\nAnswer:")
    shots = questions[0].examples.split("\n\n")[:-1]
    assert len(shots) == 2 and all(s.endswith("\nAnswer: B") for s in shots) and "0 + 1" not in questions[0].examples
    result = evaluate_multiple_choice(LLM(folder), questions)
    assert len(result.records()) == 4 and set(result.records()[0]) >= {"gold", "prediction", "loglikelihoods"}
    examples = [GenerationExample(f"Q{i}:", (f"A{i}",)) for i in range(3)]
    assert generation_fewshot(examples, 1, pool=[GenerationExample("Q:", ("A",))])[2].prompt == "Q: A\n\nQ2:"
