"""The evaluation names the project's seed promised, on top of :mod:`enigma.evaluation`.

``Evaluator(model).evaluate_all(test_texts)`` and
``BenchmarkRunner(model).run_hellaswag("data/hellaswag.jsonl")`` (also
``run_arc``, ``run_mmlu``, each with ``limit`` and ``num_fewshot``): ``model`` is an :class:`enigma.LLM` or anything
``LLM`` opens (a store name, a packaged model, a folder).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from enigma.evaluation.generation import GenerationExample, evaluate_generation
from enigma.evaluation.multiple_choice import (
    MultipleChoiceResult,
    evaluate_multiple_choice,
    read_multiple_choice,
    with_fewshot,
)
from enigma.evaluation.perplexity import perplexity


def _llm(model: Any) -> Any:
    from enigma import LLM

    return model if isinstance(model, LLM) else LLM(model)


class Evaluator:
    """Perplexity of texts and, given references, BLEU/chrF/ROUGE/exact match/F1 of answers."""

    def __init__(self, model: Any, tokenizer: Any = None) -> None:
        self.llm = _llm(model)  # the tokenizer is the model's own; the argument is the seed's signature

    def evaluate_all(self, test_texts: Sequence[str], *, prompts: Sequence[str] | None = None,
                     references: Sequence[str] | None = None, window: int | None = None,
                     stride: int | None = None) -> dict[str, float]:
        """``perplexity`` and ``bits_per_byte`` of ``test_texts``; with ``prompts`` and ``references``
        (one each) also the generation metrics of the model's answers."""
        result = perplexity(self.llm, test_texts, window=window, stride=stride)
        scores = {"perplexity": result.perplexity, "bits_per_byte": result.bits_per_byte}
        if prompts is not None:
            if references is None or len(references) != len(prompts):
                from enigma.errors import BadRequestError

                raise BadRequestError("give one reference per prompt")
            examples = [GenerationExample(p, (r,)) for p, r in zip(prompts, references)]
            scores.update(evaluate_generation(self.llm, examples).metrics)
        return scores


class BenchmarkRunner:
    """Multiple-choice benchmarks from local jsonl files, scored as lm-evaluation-harness scores them."""

    def __init__(self, model: Any) -> None:
        self.llm = _llm(model)

    def _run(self, path: str | Path, shape: str, limit: int | None, num_fewshot: int) -> MultipleChoiceResult:
        questions = read_multiple_choice(path, shape)
        if num_fewshot:
            questions = with_fewshot(questions[:limit], num_fewshot, pool=questions, same_split=True)
        return evaluate_multiple_choice(self.llm, questions[:limit], task=shape)

    def run_hellaswag(self, path: str | Path, *, limit: int | None = None, num_fewshot: int = 0,
                      ) -> MultipleChoiceResult:
        return self._run(path, "hellaswag", limit, num_fewshot)

    def run_arc(self, path: str | Path, *, limit: int | None = None, num_fewshot: int = 0) -> MultipleChoiceResult:
        return self._run(path, "arc", limit, num_fewshot)

    def run_mmlu(self, path: str | Path, *, limit: int | None = None, num_fewshot: int = 0) -> MultipleChoiceResult:
        """MMLU-shaped questions; the usual setting is ``num_fewshot=5``."""
        return self._run(path, "mmlu", limit, num_fewshot)
