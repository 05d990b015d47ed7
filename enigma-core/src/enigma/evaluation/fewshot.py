"""Few-shot prompts: examples drawn as lm-evaluation-harness draws them, so prompts are its prompts.

lm-eval's default sampler is one ``random.Random(1234)`` (its
``fewshot_random_seed``) shared by all the documents of a task, in order:
for each document it draws ``k`` examples from the few-shot pool — or, when
the pool is the evaluated data itself, ``k + 1`` and drops the document
being evaluated (and redraws from the pool without it if duplicates of the
document left too few). Each example is written ``question + " " + answer +
"\\n\\n"`` ahead of the question.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from enigma.errors import BadRequestError

T = TypeVar("T")

FEWSHOT_SEED = 1234
"""lm-eval's default ``fewshot_random_seed``."""
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


def sample_fewshot(items: Sequence[T], k: int, *, pool: Sequence[T] | None = None, same_split: bool | None = None,
                   seed: int = FEWSHOT_SEED) -> list[list[T]]:
    """For each of ``items``, in order, its ``k`` examples drawn from ``pool`` (default: ``items``).

    ``same_split`` (default: when no ``pool`` is given) says that the pool is
    the split being evaluated — all of it, however many ``items`` are: each
    item is then left out of its own examples.
    """
    if k < 0:
        raise BadRequestError(f"the number of few-shot examples must be 0 or more, not {k}")
    if k == 0:
        return [[] for _ in items]
    same_split = pool is None if same_split is None else same_split
    candidates = list(items if pool is None else pool)
    available = len(candidates) - (1 if same_split else 0)
    if available < k:
        where = "the data (less the question itself)" if same_split else "the few-shot data"
        raise BadRequestError(f"{k} few-shot examples were asked for but {where} has only {available}")
    rnd = random.Random(seed)
    drawn = []
    for item in items:
        if not same_split:
            drawn.append(rnd.sample(candidates, k))
            continue
        examples = [x for x in rnd.sample(candidates, k + 1) if x != item][:k]
        if len(examples) < k:
            examples = rnd.sample([x for x in candidates if x != item], k)
        drawn.append(examples)
    return drawn


def fewshot_prefix(examples: Sequence[tuple[str, str]]) -> str:
    """The examples ``(question, answer)`` as they lead a prompt."""
    return "".join(question + TARGET_DELIMITER + answer + FEWSHOT_DELIMITER for question, answer in examples)
