"""One sequence in the engine: what it holds and how far it has been computed.

As in vLLM v1 there is no separate prefill or decode state: a request has
``num_tokens`` (prompt + generated) and ``num_computed_tokens`` (those whose
keys and values are in the cache); each step computes some of the difference.
When the two meet, the last token's logits give the next token.
"""

from __future__ import annotations

import enum
import itertools
import time
from typing import Any

import attrs

from enigma.sequence import Sequence

_ORDER = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@attrs.define(eq=False)
class Request:
    """One completion being generated (a prompt with ``n > 1`` becomes ``n`` requests)."""

    request_id: str
    group_id: str
    """The caller's request id; shared by the ``n`` completions of one prompt."""
    sequence: Sequence
    priority: int = 0
    """Lower runs first (vLLM's convention); ties go to the earlier arrival."""
    arrival_time: float = attrs.field(factory=time.time)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    first_token_time: float | None = None
    cached_prompt_tokens: int = 0
    order: int = attrs.field(factory=lambda: next(_ORDER))
    """Unique and increasing: breaks ties between equal arrivals (the ``n`` of one prompt)."""
    adapter: str | None = None
    """The adapter (LoRA) it runs with; None: the base model. Its KV blocks are shared only with
    requests of the same adapter (it is the prefix cache's salt)."""
    prefix_cache_limit: int | None = None
    """At most this many leading tokens may come from the prefix cache (None: any; 0: compute the whole
    prompt, as when its prompt logprobs are wanted from the start)."""

    spec_token_ids: list[int] = attrs.field(factory=list)
    """Draft tokens (speculative decoding) to verify in the request's next step; set after each step."""
    spec_probs: Any = None
    """The distributions ``spec_token_ids`` were drawn from (``[drafts, vocab]``), None for point masses."""

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.sequence.prompt_token_ids

    @property
    def num_tokens(self) -> int:
        return self.sequence.num_tokens

    def all_token_ids(self) -> list[int]:
        return self.sequence.prompt_token_ids + self.sequence.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """``all_token_ids()[start:end]`` without copying the whole context (a decode step wants one token)."""
        prompt, output = self.sequence.prompt_token_ids, self.sequence.output_token_ids
        split = len(prompt)
        if start >= split:
            return output[start - split:end - split]
        if end <= split:
            return prompt[start:end]
        return prompt[start:] + output[:end - split]

    @property
    def finished(self) -> bool:
        """Its sequence stopped (a stop condition, the length limit, or an abort)."""
        return self.sequence.finished

    def sort_key(self) -> tuple[int, float, int]:
        """Most urgent first: priority, then arrival, then submission order."""
        return (self.priority, self.arrival_time, self.order)
