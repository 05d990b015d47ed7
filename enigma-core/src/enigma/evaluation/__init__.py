"""Evaluation: the numbers lm-evaluation-harness gives, from enigma's own engine.

- :mod:`enigma.evaluation.loglikelihood` scores continuations given contexts
  (lm-eval's ``loglikelihood`` request), all submitted to the engine at once;
- :mod:`enigma.evaluation.multiple_choice` reads HellaSwag, ARC, MMLU and
  plain ``{"query", "choices", "label"}`` jsonl files with lm-eval's own
  prompts and computes ``acc`` and ``acc_norm`` by its rules;
- :mod:`enigma.evaluation.perplexity` is sliding-window perplexity with a
  stride, per token and per byte;
- :mod:`enigma.evaluation.generation` answers prompts and scores them with
  :mod:`enigma.evaluation.text_metrics` (sacrebleu's BLEU and chrF,
  rouge-score's ROUGE, SQuAD's exact match and F1).
"""

from __future__ import annotations

from enigma.evaluation.generation import GenerationResult, evaluate_generation, read_generation
from enigma.evaluation.loglikelihood import loglikelihoods
from enigma.evaluation.multiple_choice import MultipleChoiceResult, evaluate_multiple_choice, read_multiple_choice
from enigma.evaluation.perplexity import PerplexityResult, perplexity
from enigma.evaluation.seed_api import BenchmarkRunner, Evaluator

__all__ = [
    "BenchmarkRunner",
    "Evaluator",
    "GenerationResult",
    "MultipleChoiceResult",
    "PerplexityResult",
    "evaluate_generation",
    "evaluate_multiple_choice",
    "loglikelihoods",
    "perplexity",
    "read_generation",
    "read_multiple_choice",
]
