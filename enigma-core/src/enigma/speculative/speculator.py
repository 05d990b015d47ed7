"""The engine's speculative decoding: drafts after each step, verification in the next.

As in vLLM's v1 engine: at the end of step N the proposer drafts up to k
tokens for every request that just received one (``request.spec_token_ids``);
step N+1 schedules each such request for ``1 + drafts`` tokens (the scheduler
also keeps k lookahead slots allocated, where a draft model writes its KV);
the target computes them in the same batched forward as everything else and
:func:`~enigma.speculative.rejection.verify_drafts` keeps the accepted prefix
plus one token of its own. Rejected positions are rolled back by
``ModelRunnerOutput.num_rejected_drafts``: the scheduler counts them as not
computed, so the next step overwrites their KV and prefix hashing only ever
sees accepted tokens.

Requests held to a grammar (structured output) are not drafted for: their
masks would have to be computed ahead for every draft position.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from enigma.speculative.config import SpeculativeConfig
from enigma.speculative.length import SpeculationLength


class Speculator:
    """Drafts, verification bookkeeping and the counters ``Engine.stats`` reports."""

    def __init__(self, config: SpeculativeConfig, proposer: Any) -> None:
        self.config = config
        self.proposer = proposer
        self.length = SpeculationLength(config.num_speculative_tokens, adaptive=config.adaptive)
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_emitted_tokens = 0
        self.accepted_per_position = [0] * config.num_speculative_tokens

    @property
    def num_lookahead_tokens(self) -> int:
        """Slots the scheduler keeps allocated past each request's tokens (where drafts' KV goes)."""
        return self.config.num_speculative_tokens if getattr(self.proposer, "needs_kv", False) else 0

    @property
    def max_draft_tokens(self) -> int:
        return self.config.num_speculative_tokens

    def resize(self, num_blocks: int) -> None:
        resize = getattr(self.proposer, "resize", None)
        if resize is not None:
            resize(num_blocks)

    # ------------------------------------------------------------ drafting

    def propose(self, requests: Sequence[Any], block_tables: Sequence[Sequence[int]], *, running: int) -> None:
        """Draft for ``requests`` (each just received a token and runs on), set ``spec_token_ids``."""
        for request in requests:
            request.spec_token_ids = []
            request.spec_probs = None
        limit = self.config.disable_by_batch_size
        if limit is not None and running >= limit:
            return
        eligible = [(request, table) for request, table in zip(requests, block_tables)
                    if request.sequence.constraint is None]
        if not eligible:
            return
        greedy = all(request.sequence.params.greedy for request, _ in eligible)
        lengths = self.length.lengths([request.request_id for request, _ in eligible], greedy=greedy)
        chosen = []
        for (request, table), k in zip(eligible, lengths):
            room = request.sequence.max_num_tokens - request.num_tokens - 1  # the target adds one of its own
            k = min(k, room)
            if k > 0:
                chosen.append((request, table, k))
        if not chosen:
            return
        started = time.perf_counter()
        proposals = self.proposer.propose([c[0] for c in chosen], [c[2] for c in chosen], [c[1] for c in chosen])
        self._record_drafting(max(c[2] for c in chosen), time.perf_counter() - started, len(chosen),
                              greedy=all(c[0].sequence.params.greedy for c in chosen))
        for (request, _, k), (drafts, probs) in zip(chosen, proposals):
            request.spec_token_ids = list(drafts[:k])
            request.spec_probs = probs[:k] if probs is not None else None

    def _record_drafting(self, forwards: int, seconds: float, batch: int, *, greedy: bool) -> None:
        """Tell the cost model what a round of drafting cost, unless the draft model spent it catching up on a
        prompt or on steps it drafted nothing for: counted, such rounds made drafting look too dear to resume,
        and a speculator that never drafts never measures again."""
        if getattr(self.proposer, "catch_up_tokens", 0) <= 2 * batch:
            self.length.record_drafting(forwards, seconds, batch, greedy=greedy)

    # ------------------------------------------------------------ verification

    def record_step(self, num_tokens: int, seconds: float) -> None:
        self.length.record_step(num_tokens, seconds)

    def record_verification(self, request_id: str, proposed: int, accepted: int, emitted: int) -> None:
        self.length.record_verification(request_id, proposed, accepted)
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        self.num_emitted_tokens += emitted
        for position in range(accepted):
            self.accepted_per_position[position] += 1

    def forget(self, request_id: str) -> None:
        """A request left the engine."""
        self.length.forget(request_id)
        self.proposer.forget(request_id)

    def stats(self) -> dict[str, float]:
        """vLLM's speculative-decoding counters (engine stats; ``/metrics`` as ``enigma:spec_decode_*``)."""
        stats: dict[str, float] = {
            "spec_decode_num_drafts": self.num_drafts,
            "spec_decode_num_draft_tokens": self.num_draft_tokens,
            "spec_decode_num_accepted_tokens": self.num_accepted_tokens,
            "spec_decode_num_emitted_tokens": self.num_emitted_tokens,
            "spec_decode_draft_acceptance_rate": (self.num_accepted_tokens / self.num_draft_tokens
                                                  if self.num_draft_tokens else 0.0),
            "spec_decode_mean_accepted_length": (1 + self.num_accepted_tokens / self.num_drafts
                                                 if self.num_drafts else 0.0),
        }
        for position, count in enumerate(self.accepted_per_position):
            stats[f"spec_decode_num_accepted_tokens_pos{position}"] = count
        return stats


def build_speculator(config: SpeculativeConfig, *, target_runner: Any, backend: Any, dtype: Any = "auto",
                     load_options: dict[str, Any] | None = None) -> Speculator:
    """The speculator ``config`` describes, for a target on ``target_runner`` (its proposer built:
    the draft model loaded on ``backend``, or a view of the target's first layers)."""
    from enigma.runner import ModelRunner

    if config.method == "ngram":
        from enigma.speculative.ngram import NgramProposer

        return Speculator(config, NgramProposer(min_n=config.prompt_lookup_min, max_n=config.prompt_lookup_max))
    from enigma.speculative.draft_model import DraftModelProposer, LeadingLayers

    if config.method == "self":
        total = target_runner.model.num_layers
        layers = config.draft_layers or max(1, total // 3)
        view = LeadingLayers(target_runner.model, layers)
        runner = ModelRunner(None, backend, block_size=target_runner.block_size, prepared=view,
                             dtype=target_runner.dtype)
        return Speculator(config, DraftModelProposer(runner, target_vocab_size=target_runner.vocab_size,
                                                     name=f"[self] first {layers} of {total} layers"))
    from enigma.llm import resolve_model_path
    from enigma.loader import load_model

    folder = resolve_model_path(config.model)
    loaded = load_model(folder, dtype=dtype if dtype != "auto" else target_runner.dtype, device=backend.device,
                        options=load_options)
    if loaded.is_embedding_model:
        from enigma.errors import BadRequestError

        raise BadRequestError(f"the draft model {config.model!r} is an embedding model; a draft must be a causal LM")
    runner = ModelRunner(loaded, backend, block_size=target_runner.block_size)
    return Speculator(config, DraftModelProposer(runner, target_vocab_size=target_runner.vocab_size,
                                                 name=str(config.model)))


__all__ = ["Speculator", "build_speculator"]
