"""Perplexity with a sliding window: every token predicted from up to ``window`` tokens before it.

Windows of ``window`` tokens start every ``stride`` tokens; each scores only
the tokens the previous window did not (Hugging Face's "perplexity of
fixed-length models" recipe), so with ``stride < window`` each token but the
first few sees at least ``window - stride`` tokens of context. Each text is
tokenized with its special tokens (a BOS where the tokenizer adds one); its
first token has nothing to be predicted from and is not scored. All windows
of all texts run through the engine at once. With ``stride == window`` the
windows do not overlap and each one's first token goes unscored, exactly as
in that recipe.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import attrs

from enigma.errors import BadRequestError


@attrs.frozen
class PerplexityResult:
    perplexity: float
    """``exp`` of the mean negative log-likelihood per scored token."""
    tokens: int
    """Tokens scored."""
    bytes: int
    """UTF-8 bytes of the texts."""
    bits_per_byte: float
    nll: float
    """Summed negative log-likelihood, in nats."""


def windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first scored position)`` of each window over ``length`` tokens."""
    spans, previous_end, begin = [], 0, 0
    while True:
        end = min(begin + window, length)
        spans.append((begin, end, max(previous_end, begin + 1)))
        previous_end = end
        if end >= length:
            return spans
        begin += stride


def perplexity(llm: Any, texts: Iterable[str], *, window: int | None = None, stride: int | None = None
               ) -> PerplexityResult:
    """Sliding-window perplexity of ``texts`` under ``llm`` (window: the context it can hold; stride: half)."""
    from enigma.sampling import SamplingParams

    texts = [text for text in texts if text]
    if not texts:
        raise BadRequestError("no text to compute perplexity over")
    window = window or min(llm.max_model_len - 1, 2048)
    stride = stride or max(1, window // 2)
    if not 0 < stride <= window < llm.max_model_len:
        raise BadRequestError(f"window {window} and stride {stride} are invalid: need 0 < stride <= window < "
                              f"{llm.max_model_len} (the model's context)")
    prompts, scored = [], []
    for text in texts:
        ids = llm.tokenizer.encode(text)
        for begin, end, first in windows(len(ids), window, stride):
            if first < end:
                prompts.append(ids[begin:end])
                scored.append(first - begin)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    nll, tokens = 0.0, 0
    for prompt, start, output in zip(prompts, scored, outputs):
        for position in range(start, len(prompt)):
            nll -= output.prompt_logprobs[position][prompt[position]].logprob
            tokens += 1
    size = sum(len(text.encode("utf-8")) for text in texts)
    return PerplexityResult(perplexity=math.exp(nll / tokens), tokens=tokens, bytes=size,
                            bits_per_byte=nll / math.log(2) / size, nll=nll)
