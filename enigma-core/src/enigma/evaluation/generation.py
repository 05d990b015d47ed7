"""Generation tasks: prompts answered by the engine, scored against references.

A jsonl file of ``{"prompt": ..., "reference": ...}`` (or ``"references": [...]``)
records; every prompt goes to the engine at once, greedy unless told
otherwise, stopping at ``max_tokens`` or a stop string; the answers are
scored with :mod:`enigma.evaluation.text_metrics`. :func:`with_fewshot` leads
each prompt with answered examples.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from enigma.errors import BadRequestError, NotFoundError
from enigma.evaluation import text_metrics
from enigma.evaluation.fewshot import FEWSHOT_SEED, fewshot_prefix, sample_fewshot


@attrs.frozen
class GenerationExample:
    prompt: str
    references: tuple[str, ...]


def with_fewshot(examples: Sequence[GenerationExample], k: int, *, pool: Sequence[GenerationExample] | None = None,
                 same_split: bool | None = None, seed: int = FEWSHOT_SEED) -> list[GenerationExample]:
    """``examples`` whose prompts lead with ``k`` answered examples (prompt, first reference), drawn as
    lm-eval draws them (see :func:`enigma.evaluation.fewshot.sample_fewshot`)."""
    drawn = sample_fewshot(examples, k, pool=pool, same_split=same_split, seed=seed)
    return [attrs.evolve(example, prompt=fewshot_prefix([(e.prompt, e.references[0]) for e in shots]) + example.prompt)
            for example, shots in zip(examples, drawn)]


@attrs.frozen
class GenerationResult:
    count: int
    metrics: dict[str, float]
    predictions: tuple[str, ...]
    prompts: tuple[str, ...] = ()
    references: tuple[tuple[str, ...], ...] = ()

    def records(self) -> list[dict[str, Any]]:
        """One record per example: the prompt as sent, the answer, the references."""
        return [{"index": i, "prompt": prompt, "prediction": prediction, "references": list(references)}
                for i, (prompt, prediction, references) in enumerate(zip(self.prompts, self.predictions,
                                                                           self.references))]


def read_generation(path: str | Path, *, limit: int | None = None) -> list[GenerationExample]:
    """The examples of a jsonl file; errors name the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"task data {path} does not exist")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            references = record["references"] if "references" in record else [record["reference"]]
            if not isinstance(record["prompt"], str) or not references or not all(
                    isinstance(r, str) for r in references):
                raise TypeError("'prompt' must be a string and the references non-empty strings")
        except (ValueError, KeyError, TypeError) as exc:
            raise BadRequestError(f"{path}, line {number}: not a generation record ({type(exc).__name__}: {exc}); "
                                  "give 'prompt' and 'reference' (or 'references')") from None
        examples.append(GenerationExample(record["prompt"], tuple(references)))
        if limit is not None and len(examples) >= limit:
            break
    return examples


def evaluate_generation(llm: Any, examples: Sequence[GenerationExample], *, max_tokens: int = 64,
                        stop: Sequence[str] = ("\n\n",), temperature: float = 0.0) -> GenerationResult:
    """BLEU, chrF, ROUGE-1/2/L/Lsum, exact match and token F1 of ``llm``'s answers to ``examples``."""
    from enigma.sampling import SamplingParams

    if not examples:
        raise BadRequestError("no examples to evaluate")
    params = SamplingParams(max_tokens=max_tokens, stop=list(stop), temperature=temperature)
    outputs = llm.generate([example.prompt for example in examples], params)
    predictions = [output.outputs[0].text.strip() for output in outputs]
    references = [example.references for example in examples]
    metrics = {"bleu": text_metrics.bleu(predictions, references), "chrf": text_metrics.chrf(predictions, references),
               **text_metrics.rouge(predictions, references),
               "exact_match": text_metrics.exact_match(predictions, references),
               "f1": text_metrics.token_f1(predictions, references)}
    return GenerationResult(len(examples), metrics, tuple(predictions), tuple(e.prompt for e in examples),
                            tuple(references))
