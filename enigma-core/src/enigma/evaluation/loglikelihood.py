"""Log-likelihoods of continuations given contexts, batched through the engine.

Tokenized as lm-evaluation-harness does for causal models: trailing spaces
of the context move to the continuation, the whole text is encoded, and the
continuation is what follows the context's tokens. With ``add_special_tokens``
(the default, as lm-eval's ``hf`` backend encodes) the tokenizer's BOS leads
the context; without it (as its ``local-completions`` backend asks a server's
``/tokenize``) it does not. Every pair goes to the
engine at once (continuous batching); each is one prompt whose prompt
logprobs are read at the continuation's positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def encode_pair(tokenizer: Any, context: str, continuation: str, *,
                add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
    """``(context tokens, continuation tokens)`` split as lm-eval's ``_encode_pair`` splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=add_special_tokens)
    context_ids = tokenizer.encode(context, add_special_tokens=add_special_tokens)
    return context_ids, whole[len(context_ids):]


def loglikelihoods(llm: Any, pairs: Sequence[tuple[str, str]], *,
                   add_special_tokens: bool = True) -> list[tuple[float, bool]]:
    """``(sum of the continuation's token logprobs, whether greedy decoding would produce it)`` per pair.

    Pairs that share a context compute it once: the first pair of each context
    runs first, and the others then take the context's KV blocks from the
    prefix cache (prompt logprobs start at the continuation,
    ``SamplingParams.prompt_logprobs_start``).
    """
    from enigma.sampling import SamplingParams

    prefix = list(llm.tokenizer.eos_token_ids[:1])  # an empty context is conditioned on EOS, as lm-eval does
    encoded = [encode_pair(llm.tokenizer, context, continuation, add_special_tokens=add_special_tokens) if context
               else (prefix, llm.tokenizer.encode(continuation, add_special_tokens=False))
               for context, continuation in pairs]
    first_of_context: dict[tuple[int, ...], int] = {}
    for index, (context, _) in enumerate(encoded):
        first_of_context.setdefault(tuple(context), index)
    leaders = sorted(first_of_context.values())
    leading = set(leaders)
    followers = [index for index in range(len(encoded)) if index not in leading]
    results: list[tuple[float, bool]] = [(0.0, True)] * len(encoded)
    for batch in (leaders, followers):
        if not batch:
            continue
        prompts = [encoded[i][0] + encoded[i][1] for i in batch]
        params = [SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1,
                                 prompt_logprobs_start=len(encoded[i][0])) for i in batch]
        for index, prompt, output in zip(batch, prompts, llm.generate(prompts, params)):
            total, greedy = 0.0, True
            for position in range(len(encoded[index][0]), len(prompt)):
                chosen = output.prompt_logprobs[position][prompt[position]]
                total += chosen.logprob
                greedy = greedy and chosen.rank == 1
            results[index] = (total, greedy)
    return results
