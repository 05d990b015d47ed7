"""Rejection sampling of draft tokens: the output keeps the target's distribution exactly.

The algorithm of Leviathan et al. (2023) and Chen et al. (2023), as vLLM
implements it: draft token ``d_i`` was drawn from the draft's distribution
``q_i``; it is accepted with probability ``min(1, p_i(d_i) / q_i(d_i))``,
where ``p_i`` is the distribution the target's sampler would draw from at
that position. At the first rejection the replacement is drawn from
``max(0, p_i - q_i)`` renormalised; when every draft is accepted a bonus
token comes from ``p_k``. Each emitted token is then distributed exactly as
the target's own sampling would give it. A draft without a distribution
(prompt lookup) is a point mass: accepted with probability ``p_i(d_i)``,
replaced from ``p_i`` without ``d_i``. For greedy requests ``p_i`` puts all
its mass on the argmax, so drafts are kept while they equal the target's
argmax and the output is token for token that of greedy decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def verify_drafts(target_probs: torch.Tensor, draft_token_ids: Sequence[int], draft_probs: torch.Tensor | None,
                  *, generator: torch.Generator | None = None, greedy: bool = False) -> list[int]:
    """The tokens to emit for one request: the accepted drafts, then one token drawn by the target.

    ``target_probs``: ``[k + 1, vocab]``, row ``i`` the target's sampling distribution after the
    context and the first ``i`` drafts (:func:`enigma.sampling.sampling_probs`). ``draft_probs``:
    ``[k, vocab]`` the distributions the drafts were drawn from, or None for point masses.
    With ``greedy`` the rows' argmaxes decide (the same tokens, no random draws). Returns between 1
    and ``k + 1`` tokens.
    """
    k = len(draft_token_ids)
    if target_probs.shape[0] != k + 1:
        raise ValueError(f"verify_drafts needs k + 1 = {k + 1} rows of target probabilities, "
                         f"got {target_probs.shape[0]}")
    if greedy:
        return accept_greedy(target_probs.argmax(dim=-1).tolist(), draft_token_ids)
    emitted: list[int] = []
    for index, token in enumerate(draft_token_ids):
        p = target_probs[index]
        target_mass = float(p[token])
        draft_mass = 1.0 if draft_probs is None else float(draft_probs[index, token])
        if target_mass >= draft_mass or (target_mass > 0.0 and _uniform(generator) * draft_mass < target_mass):
            emitted.append(int(token))
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[token] = 0.0
        else:
            residual = (p - draft_probs[index]).clamp_(min=0.0)
        if not float(residual.sum()) > 0.0:  # only by rounding: p and q agree wherever p has mass
            residual = p
        emitted.append(int(torch.multinomial(residual, 1, generator=generator)))
        return emitted
    emitted.append(int(torch.multinomial(target_probs[k], 1, generator=generator)))
    return emitted


def accept_greedy(best: Sequence[int], draft_token_ids: Sequence[int]) -> list[int]:
    """The tokens a greedy request emits: its drafts while they equal the target's argmaxes ``best`` (one
    per position, ``k + 1``), then the target's argmax where they part (or after the last draft)."""
    emitted = []
    for index, token in enumerate(draft_token_ids):
        if best[index] != token:
            break
        emitted.append(int(token))
    return [*emitted, best[len(emitted)]]


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator, device=generator.device if generator is not None else "cpu"))
