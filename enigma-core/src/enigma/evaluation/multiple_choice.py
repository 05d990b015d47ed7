"""Multiple-choice tasks scored as lm-evaluation-harness scores them (``acc``, ``acc_norm``).

Each document becomes a context and its choices; each choice is scored as
the continuation ``" " + choice`` (lm-eval's target delimiter). ``acc`` is
how often the most likely choice is the gold one; ``acc_norm`` divides each
choice's log-likelihood by its length in characters first. The prompts are
lm-eval's for each shape (:func:`with_fewshot` adds its few-shot examples):

``hellaswag``  ``{"activity_label", "ctx_a", "ctx_b", "endings", "label"}`` (its preprocessing included)
``arc``        ``{"question", "choices": {"text", "label"}, "answerKey"}`` — "Question: ...\\nAnswer:"
``mmlu``       ``{"question", "choices", "answer", "subject"?}`` — lettered options, choices " A".." D"
``mc``         ``{"query"|"question"|"context", "choices", "label"|"gold"|"answer"}`` — the query as it is
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs

from enigma.errors import BadRequestError, NotFoundError
from enigma.evaluation.fewshot import FEWSHOT_SEED, fewshot_prefix, sample_fewshot
from enigma.evaluation.loglikelihood import loglikelihoods

SHAPES = ("hellaswag", "arc", "mmlu", "mc")


@attrs.frozen
class Question:
    text: str
    """The question as a few-shot example shows it."""
    choices: tuple[str, ...]
    gold: int
    description: str = ""
    """What leads the whole prompt, once (MMLU's "The following are multiple choice questions...")."""
    examples: str = ""
    """The few-shot examples between the description and the question (see :func:`with_fewshot`)."""

    @property
    def context(self) -> str:
        """What the choices continue: description, examples, question."""
        return self.description + self.examples + self.text


def with_fewshot(questions: Sequence[Question], k: int, *, pool: Sequence[Question] | None = None,
                 same_split: bool | None = None, seed: int = FEWSHOT_SEED) -> list[Question]:
    """``questions`` with ``k`` answered examples each, drawn as lm-eval draws them from ``pool``
    (default: ``questions``, each less itself; see :func:`enigma.evaluation.fewshot.sample_fewshot`)."""
    drawn = sample_fewshot([attrs.evolve(q, examples="") for q in questions], k,
                           pool=None if pool is None else [attrs.evolve(q, examples="") for q in pool],
                           same_split=same_split, seed=seed)
    return [attrs.evolve(q, examples=fewshot_prefix([(e.text, e.choices[e.gold]) for e in examples]))
            for q, examples in zip(questions, drawn)]


@attrs.frozen
class MultipleChoiceResult:
    task: str
    count: int
    acc: float
    acc_norm: float
    predictions: tuple[int, ...]
    """The chosen index per question (by raw log-likelihood)."""
    predictions_norm: tuple[int, ...] = ()
    """The chosen index per question by log-likelihood per character (``acc_norm``'s choice)."""
    loglikelihoods: tuple[tuple[float, ...], ...] = ()
    """Each question's choices' log-likelihoods."""
    golds: tuple[int, ...] = ()

    def records(self) -> list[dict[str, Any]]:
        """One record per question (lm-eval's ``--log_samples``): gold, choices' log-likelihoods, picks."""
        return [{"index": i, "gold": gold, "prediction": p, "prediction_norm": pn, "loglikelihoods": list(lls),
                 "acc": float(p == gold), "acc_norm": float(pn == gold)}
                for i, (gold, p, pn, lls) in enumerate(zip(self.golds, self.predictions, self.predictions_norm,
                                                             self.loglikelihoods))]


def _hellaswag_text(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _question(shape: str, doc: dict[str, Any]) -> Question:
    if shape == "hellaswag":
        context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return Question(_hellaswag_text(doc["activity_label"] + ": " + context),
                        tuple(_hellaswag_text(ending) for ending in doc["endings"]), int(doc["label"]))
    if shape == "arc":
        labels = list(doc["choices"]["label"])
        return Question(f"Question: {doc['question']}\nAnswer:", tuple(doc["choices"]["text"]),
                        labels.index(doc["answerKey"]))
    if shape == "mmlu":
        options = "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCD", doc["choices"]))
        subject = doc.get("subject")
        about = (f"The following are multiple choice questions (with answers) about "
                 f"{subject.replace('_', ' ')}.\n\n") if subject else ""
        return Question(f"{doc['question'].strip()}{options}\nAnswer:", ("A", "B", "C", "D"), int(doc["answer"]),
                        description=about)
    context = next(doc[key] for key in ("query", "question", "context") if key in doc)
    gold = next(doc[key] for key in ("label", "gold", "answer") if key in doc)
    return Question(context, tuple(doc["choices"]), int(gold))


def read_multiple_choice(path: str | Path, shape: str = "mc", *, limit: int | None = None) -> list[Question]:
    """The questions of a jsonl file of one of :data:`SHAPES`; errors name the file, line and field."""
    if shape not in SHAPES:
        raise BadRequestError(f"multiple-choice shape {shape!r} is not known; choose {', '.join(SHAPES)}")
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"task data {path} does not exist")
    questions = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                question = _question(shape, json.loads(line))
            except (ValueError, KeyError, StopIteration, TypeError, AttributeError) as exc:
                raise BadRequestError(f"{path}, line {number}: not a {shape} record ({type(exc).__name__}: {exc}); "
                                      f"see enigma.evaluation.multiple_choice for the fields") from None
            if not 0 <= question.gold < len(question.choices):
                raise BadRequestError(f"{path}, line {number}: the gold answer {question.gold} is not one of its "
                                      f"{len(question.choices)} choices")
            questions.append(question)
            if limit is not None and len(questions) >= limit:
                break
    return questions


def evaluate_multiple_choice(llm: Any, questions: Iterable[Question], *, task: str = "mc",
                             add_special_tokens: bool = True) -> MultipleChoiceResult:
    """``acc`` and ``acc_norm`` of ``llm`` over ``questions``, every choice of every question batched.

    ``add_special_tokens``: lead each context with the tokenizer's BOS, as lm-eval's ``hf`` backend
    does (its ``local-completions`` backend does not: pass False to match it)."""
    questions = list(questions)
    if not questions:
        raise BadRequestError("no questions to evaluate")
    pairs = [(q.context, " " + choice) for q in questions for choice in q.choices]
    scores = iter(score for score, _ in loglikelihoods(llm, pairs, add_special_tokens=add_special_tokens))
    predictions, predictions_norm, all_lls = [], [], []
    for question in questions:
        lls = tuple(next(scores) for _ in question.choices)
        predictions.append(max(range(len(lls)), key=lambda i: lls[i]))
        predictions_norm.append(max(range(len(lls)), key=lambda i: lls[i] / len(question.choices[i])))
        all_lls.append(lls)
    golds = [q.gold for q in questions]
    count = len(questions)
    correct = sum(p == g for p, g in zip(predictions, golds))
    correct_norm = sum(p == g for p, g in zip(predictions_norm, golds))
    return MultipleChoiceResult(task, count, correct / count, correct_norm / count, tuple(predictions),
                                tuple(predictions_norm), tuple(all_lls), tuple(golds))
