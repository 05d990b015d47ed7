"""Drafting with a model: a smaller one (``draft``) or the target's own first layers (``self``).

The draft runs on its own :class:`~enigma.runner.ModelRunner` whose KV pool has
the target's geometry and is addressed through the *target's* block tables:
the scheduler allocates ``num_speculative_tokens`` lookahead slots past each
request's tokens, so the draft can write the keys and values of its guesses
where the target will compute them. Nothing is copied and nothing needs
freeing: the blocks come and go with the request's.

Per request the proposer remembers how far the draft's KV is valid. Each
proposal first computes the tokens since then in one batched forward (after a
verify step: the accepted draft the draft never computed, and the new
token), which also gives the first draft token; the others come from one
single-token forward each. For greedy requests the runner's
:meth:`~enigma.runner.ModelRunner.decode_greedy` does it all: the native
decoder's steps back to back where the backend has it. Drafts the target rejected leave stale KV behind,
which the next catch-up overwrites. A preempted request (its blocks gone)
starts over. Several requests may write the same shared prefix block: the
same tokens at the same positions, so the same values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch

from enigma.errors import BadRequestError, NotAvailableError
from enigma.runner import ModelRunner, SequenceChunk
from enigma.sampling import filtered_probs


@attrs.define
class _DraftState:
    preemptions: int
    base: int
    """The request's token count when the drafts were made: KV valid through ``base - 1``."""
    drafts: list[int]


class LeadingLayers(torch.nn.Module):
    """The first ``num_layers`` layers of a prepared causal LM, with its final norm and head:
    a draft that shares every weight with the target (LayerSkip-style self-speculation)."""

    def __init__(self, model: torch.nn.Module, num_layers: int) -> None:
        super().__init__()
        total = getattr(model, "num_layers", None)
        if total is None or "num_layers" not in model.forward.__code__.co_varnames:
            raise NotAvailableError(f"a self-draft needs a model whose forward can stop after some layers; "
                                    f"{type(model).__name__} cannot (use a draft model or [ngram])")
        if not 1 <= num_layers < total:
            raise BadRequestError(f"draft_layers = {num_layers} is invalid for a model of {total} layers: "
                                  f"give 1 to {total - 1}")
        self.__dict__["target"] = model  # not a submodule: its parameters belong to the target
        self.config = model.config
        self._num_layers = num_layers

    @property
    def num_layers(self) -> int:
        return self._num_layers

    @property
    def kv_shape(self) -> tuple[int, int]:
        return self.target.kv_shape

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, context: Any) -> torch.Tensor:
        return self.target(input_ids, positions, context, num_layers=self._num_layers)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.target.compute_logits(hidden)

    def decode_greedy(self, *args: Any, **kwargs: Any) -> list[list[int]] | None:
        decode = getattr(self.target, "decode_greedy", None)
        return None if decode is None else decode(*args, **kwargs, num_layers=self._num_layers)


class DraftModelProposer:
    """Drafts with a model on its own runner (see the module's docstring)."""

    needs_kv = True
    catch_up_tokens = 0
    """Tokens the last :meth:`propose`'s first forward fed the draft model to catch its KV up: one or two a
    request while drafting runs every step, a whole prompt or many steps' worth after a pause."""

    def __init__(self, runner: ModelRunner, *, target_vocab_size: int, name: str) -> None:
        if runner.vocab_size != target_vocab_size:
            raise BadRequestError(f"the draft model {name!r} has a vocabulary of {runner.vocab_size} tokens but the "
                                  f"target's has {target_vocab_size}; a draft must share the target's tokenizer")
        self.runner = runner
        self.name = name
        self._states: dict[str, _DraftState] = {}

    def resize(self, num_blocks: int) -> None:
        """Give the draft a KV pool of the target's size (the same block ids address both)."""
        self.runner.resize(num_blocks)

    def _valid(self, request: Any, tokens: Sequence[int]) -> int:
        state = self._states.get(request.request_id)
        if state is None or state.preemptions != request.num_preemptions or state.base > len(tokens):
            return 0
        valid = state.base
        for draft in state.drafts[:-1]:  # the last draft was never fed to the draft model
            if valid >= len(tokens) or tokens[valid] != draft:
                break
            valid += 1
        return min(valid, len(tokens) - 1)

    @torch.inference_mode()
    def propose(self, requests: Sequence[Any], lengths: Sequence[int], block_tables: Sequence[Sequence[int]]
                ) -> list[tuple[list[int], torch.Tensor | None]]:
        """Per request up to ``lengths[i]`` draft tokens and the distributions they were drawn from
        (None for greedy requests: their verification needs no draft probabilities)."""
        contexts = [request.all_token_ids() for request in requests]
        chunks = []
        for request, tokens, table in zip(requests, contexts, block_tables):
            valid = self._valid(request, tokens)
            chunks.append(SequenceChunk(tokens[valid:], valid, table))
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        if all(request.sequence.params.greedy for request in requests):
            drafts = self.runner.decode_greedy([chunk.token_ids for chunk in chunks], [chunk.start for chunk in chunks],
                                               block_tables, lengths)
            return self._remember(requests, contexts, drafts, chunks, probs)
        logits = self.runner.execute(chunks).last
        drafts: list[list[int]] = [[] for _ in requests]
        active = list(range(len(requests)))
        for step in range(max(lengths, default=0)):
            for row, index in enumerate(active):
                token, distribution = self._draw(logits[row], requests[index])
                drafts[index].append(token)
                if distribution is not None:
                    probs[index].append(distribution)
            active = [index for index in active if lengths[index] > step + 1]
            if not active:
                break
            logits = self.runner.execute([
                SequenceChunk([drafts[i][-1]], len(contexts[i]) + step, block_tables[i]) for i in active]).last
        return self._remember(requests, contexts, drafts, chunks, probs)

    def _remember(self, requests: Sequence[Any], contexts: Sequence[Sequence[int]], drafts: list[list[int]],
                  chunks: Sequence[SequenceChunk], probs: list[list[torch.Tensor]]
                  ) -> list[tuple[list[int], torch.Tensor | None]]:
        """Note how far each request's draft KV now reaches; the proposals ``propose`` returns."""
        self.catch_up_tokens = sum(len(chunk.token_ids) for chunk in chunks)
        for request, tokens, mine in zip(requests, contexts, drafts):
            self._states[request.request_id] = _DraftState(request.num_preemptions, len(tokens), mine)
        return [(mine, torch.stack(rows) if rows else None) for mine, rows in zip(drafts, probs)]

    @staticmethod
    def _draw(logits: torch.Tensor, request: Any) -> tuple[int, torch.Tensor | None]:
        params = request.sequence.params
        if params.greedy:
            return int(logits.argmax()), None
        distribution = filtered_probs(logits, params)
        return int(torch.multinomial(distribution, 1, generator=request.sequence.row.generator)), distribution

    def forget(self, request_id: str) -> None:
        """The request left: drop what is known of its draft KV."""
        self._states.pop(request_id, None)
