"""Which requests run in each step: continuous batching under a token budget.

Every step the scheduler first keeps the running requests going (one token
each for decodes, the next chunk for a long prefill), then admits waiting
requests while the token budget and ``max_num_seqs`` allow. A prompt longer
than the budget is prefilled in chunks, so running decodes keep flowing.
When the cache has no block for a running request, the newest (lowest
priority) running request is preempted: its blocks are freed and it goes back
to the front of the queue, to be recomputed later (vLLM's recompute
preemption). ``running`` stays ordered most urgent first and victims come
from its end, so the most urgent request always makes progress and two
requests can never keep preempting each other. Finished and aborted requests
leave at once, blocks freed.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any

from enigma.engine.request import Request, RequestStatus
from enigma.kinds import ModelRunnerOutput, ScheduledRequest, SchedulerOutput


class Scheduler:
    """The builtin ``continuous`` scheduler (FCFS, honouring ``priority``)."""

    def __init__(self, cache: Any, *, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 num_lookahead_tokens: int = 0) -> None:
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_lookahead_tokens = num_lookahead_tokens
        """Slots kept allocated past a request's tokens once its prompt is in: where a draft model
        writes the KV of its guesses (speculative decoding)."""
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self.waiting.sort(key=Request.sort_key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """This step's work; every scheduled request has blocks for its chunk."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Request, int, list[int]]] = []
        preempted: list[Request] = []
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            remaining = request.num_tokens - request.num_computed_tokens
            drafts = request.spec_token_ids if remaining == 1 else []
            num_new = min(remaining + len(drafts), budget)
            drafts = drafts[:max(0, num_new - remaining)]
            while not self.cache.allocate(request.request_id, self._slots(request, num_new)):
                victim = self.running[-1]  # the least urgent; never one already scheduled this step
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled.append((request, num_new, drafts))
                budget -= num_new
                index += 1

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            request = self.waiting[0]
            tokens = request.all_token_ids()
            if request.prefix_cache_limit is not None:
                tokens = tokens[: request.prefix_cache_limit]
            if request.adapter is None:
                cached = self.cache.lookup_prefix(request.request_id, tokens)
            else:
                cached = self.cache.lookup_prefix(request.request_id, tokens, salt=request.adapter)
            num_new = min(request.num_tokens - cached, budget)
            self._expect(request)
            request.num_computed_tokens = cached
            if not self.cache.allocate(request.request_id, self._slots(request, num_new)):
                # A waiting request holds no blocks (else two could deadlock holding
                # halves); its prefix stays cached for the next try.
                self.cache.cancel(request.request_id)
                request.num_computed_tokens = 0
                break
            if request.num_preemptions == 0:
                request.cached_prompt_tokens = cached
            self.waiting.pop(0)
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=Request.sort_key)
            scheduled.append((request, num_new, []))
            budget -= num_new
        return SchedulerOutput(
            scheduled=[ScheduledRequest(request=request, num_tokens=num_new, start=request.num_computed_tokens,
                                        block_table=self.cache.block_table(request.request_id),
                                        draft_token_ids=tuple(drafts))
                       for request, num_new, drafts in scheduled],
            preempted=preempted)

    def _slots(self, request: Request, num_new: int) -> int:
        """The tokens ``request``'s blocks must cover to compute ``num_new`` more: with lookahead
        slots once its prompt is in (never past the most it can reach)."""
        needed = request.num_computed_tokens + num_new
        if not self.num_lookahead_tokens or needed < request.num_tokens:
            return needed
        return max(needed, min(needed + self.num_lookahead_tokens, request.sequence.max_num_tokens))

    def _expect(self, request: Request) -> None:
        """Tell a cache that places blocks by expected length (the builtin ``paged``) how long
        ``request`` may grow, so its blocks stay consecutive; other caches need not know."""
        expect = getattr(self.cache, "expect", None)
        if expect is not None:
            expect(request.request_id, request.sequence.max_num_tokens)

    def follow_on(self, output: SchedulerOutput) -> SchedulerOutput | None:
        """The next decode of ``output``'s requests, for the engine to queue while their tokens are being drawn
        (async scheduling): each unfinished one one token further, a slot allocated for it; None when this
        scheduler must choose afresh — requests waiting, running requests the step left out, or no room."""
        if self.waiting:
            return None
        live = [item for item in output.scheduled if not item.request.finished]
        if len(live) != len(self.running):
            return None
        follow = []
        for item in live:
            request = item.request
            position = item.start + item.num_tokens  # where the token being drawn goes
            if position + 2 > request.sequence.max_num_tokens:
                continue  # that token ends it
            if not self.cache.allocate(request.request_id, position + 1 + self.num_lookahead_tokens):
                return None  # preemption is schedule()'s; what was allocated here it uses
            follow.append(ScheduledRequest(request=request, num_tokens=1, start=position,
                                           block_table=self.cache.block_table(request.request_id)))
        return SchedulerOutput(scheduled=follow) if follow else None

    def update_from_output(self, output: SchedulerOutput, runner_output: ModelRunnerOutput) -> None:
        """Advance computed tokens, commit full blocks for prefix caching, release finished requests."""
        for item in output.scheduled:
            request = item.request
            rejected = runner_output.num_rejected_drafts.get(request.request_id, 0)
            request.num_computed_tokens = item.start + item.num_tokens - rejected
            if self._fills_a_block(item.start, request.num_computed_tokens):  # finished ones too: reusable
                self.cache.commit(request.request_id, request.all_token_ids()[: request.num_computed_tokens])
            if request.finished:
                self._finish(request)

    def _fills_a_block(self, before: int, after: int) -> bool:
        """Whether computing tokens ``before..after`` completed a block (only then is there one to commit;
        building the token list every decode step would cost O(context) for nothing)."""
        block_size = getattr(self.cache, "block_size", None)
        return block_size is None or after // block_size > before // block_size

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.cache.free(request.request_id)
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.spec_probs = None
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.num_preemptions += 1
        self.waiting.insert(0, request)

    def _finish(self, request: Request) -> None:
        """Take a finished request out and free its blocks."""
        request.status = RequestStatus.FINISHED
        if request in self.running:
            self.running.remove(request)
        if request in self.waiting:
            self.waiting.remove(request)
        self.cache.free(request.request_id)

    def abort(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self._finish(request)

    def stats(self) -> dict[str, float]:
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "preempted": sum(1 for r in self.waiting if r.status is RequestStatus.PREEMPTED),
            "preemptions_total": self.num_preemptions,
        }
