"""Scores of generated text against references: BLEU and chrF (sacrebleu), ROUGE (rouge-score),
exact match and token F1 (SQuAD's normalisation).

The reference scorers are called, not reimplemented, so the numbers are
theirs: ``sacrebleu.corpus_bleu`` / ``corpus_chrf`` over the whole set, and
``rouge_score``'s scorer averaged per example (F-measure, Porter stemming,
``rougeLsum`` with sentences split on newlines), as their users report them.
They are optional dependencies: ``pip install sacrebleu rouge-score``.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

from enigma.errors import NotAvailableError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _need(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise NotAvailableError(f"this metric needs {package}, which is not installed; pip install {package}") \
            from None


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu's defaults: 13a tokenisation, exponential smoothing), 0-100.
    ``references[i]`` holds every reference of prediction ``i``."""
    sacrebleu = _need("sacrebleu", "sacrebleu")
    streams = [list(stream) for stream in zip(*_padded(references))]
    return sacrebleu.corpus_bleu(list(predictions), streams).score


def chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus chrF (sacrebleu's defaults), 0-100."""
    sacrebleu = _need("sacrebleu", "sacrebleu")
    streams = [list(stream) for stream in zip(*_padded(references))]
    return sacrebleu.corpus_chrf(list(predictions), streams).score


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F-measures averaged over examples (the best reference of each), 0-1."""
    rouge_scorer = _need("rouge_score.rouge_scorer", "rouge-score")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, refs in zip(predictions, references):
        scores = scorer.score_multi(list(refs), prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: total / len(predictions) for name, total in totals.items()}


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Share of predictions equal to one of their references after :func:`normalize_answer`, 0-1."""
    return sum(any(normalize_answer(p) == normalize_answer(r) for r in refs)
               for p, refs in zip(predictions, references)) / len(predictions)


def token_f1(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """SQuAD's token F1, the best reference of each prediction, averaged, 0-1."""
    def f1(prediction: str, reference: str) -> float:
        ours, theirs = normalize_answer(prediction).split(), normalize_answer(reference).split()
        common = sum((collections.Counter(ours) & collections.Counter(theirs)).values())
        if not ours or not theirs:
            return float(ours == theirs)
        if common == 0:
            return 0.0
        precision, recall = common / len(ours), common / len(theirs)
        return 2 * precision * recall / (precision + recall)

    return sum(max(f1(p, r) for r in refs) for p, refs in zip(predictions, references)) / len(predictions)


def _padded(references: Sequence[Sequence[str]]) -> list[list[str]]:
    """Every example with the same number of references (sacrebleu's streams), the last one repeated."""
    width = max(len(refs) for refs in references)
    return [list(refs) + [refs[-1]] * (width - len(refs)) for refs in references]
