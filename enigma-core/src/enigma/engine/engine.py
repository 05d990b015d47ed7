"""The engine: requests in, one batched forward per step, outputs out.

``add_request`` validates and queues; ``step`` asks the scheduler for this
step's work (a :class:`~enigma.kinds.SchedulerOutput`: prefills, chunked
prefills and decodes together), checks it against the scheduler's contract,
runs it as one forward pass through the :class:`~enigma.runner.ModelRunner`,
samples the next token of every request whose tokens are all computed, hands
the result back (``scheduler.update_from_output``: the scheduler, never the
engine, advances computed tokens and talks to the cache) and returns the
outputs of the prompts that moved. Lifecycle events go out through the
plugin host (``enigma_request_started`` / ``_finished``, ``enigma_engine_*``).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Any

import attrs
import torch

from enigma.engine.request import Request, RequestStatus
from enigma.errors import BadRequestError, NotFoundError, PluginError
from enigma.events import RequestFinished, RequestStarted
from enigma.kinds import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from enigma.outputs import CompletionOutput, RequestOutput
from enigma.runner import ModelRunner, SequenceChunk
from enigma.sampling import (
    PendingSample,
    SamplingParams,
    grammar_masks,
    needs_processing,
    start_sample,
    top_logprobs,
    with_token_texts,
)
from enigma.sequence import Sequence
from enigma.transfer import to_device


class _Group:
    """The ``n`` requests of one prompt, and what its outputs report."""

    def __init__(self, group_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams):
        self.group_id = group_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.requests: list[Request] = []
        self.prompt_logprobs: list | None = [None] if params.prompt_logprobs is not None else None
        self.streamed_tokens: list[int] = []  # per completion, for delta outputs

    @property
    def finished(self) -> bool:
        return all(request.finished for request in self.requests)


@attrs.define
class _Launched:
    """A step queued on the device, waiting to be taken in (:meth:`Engine._complete`)."""

    output: SchedulerOutput
    logits: Any
    prompt_logprob_items: set[int]
    started: float
    decode_only: bool
    follows_on: bool
    """Scheduled by the engine from the previous step's requests, before their tokens were known."""
    to_sample: list[int] = attrs.field(factory=list)
    to_verify: list[int] = attrs.field(factory=list)
    draw: PendingSample | None = None


class Engine:
    """Continuous batching over a paged KV cache for one causal LM.

    The engine owns its runner's KV pool (it sizes it to ``num_blocks``): give
    each engine a runner of its own.
    """

    def __init__(self, runner: ModelRunner, tokenizer: Any, *, model_name: str, num_blocks: int,
                 cache: str = "auto", scheduler: str = "auto", max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, enable_prefix_caching: bool = True, host: Any = None,
                 speculator: Any = None, async_scheduling: bool | None = None) -> None:
        if host is None:
            from enigma.plugins import get_host

            host = get_host()
        self._host = host
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_name = model_name
        runner.resize(num_blocks)
        self.speculator = speculator
        """A :class:`enigma.speculative.speculator.Speculator` (speculative decoding), or None."""
        if speculator is not None:
            speculator.resize(num_blocks)
        block_size = runner.block_size
        self.max_model_len = min(runner.max_model_len, num_blocks * block_size)
        self.num_blocks = num_blocks
        self.cache = host.create("cache", cache, num_blocks=num_blocks, block_size=block_size,
                                 max_model_len=self.max_model_len, enable_prefix_caching=enable_prefix_caching)
        self._scheduler_impl = host.select("scheduler", scheduler)
        extra = {}
        if speculator is not None and speculator.num_lookahead_tokens:
            extra["num_lookahead_tokens"] = speculator.num_lookahead_tokens
        try:
            self.scheduler = self._scheduler_impl.create(cache=self.cache, max_num_seqs=max_num_seqs,
                                                         max_num_batched_tokens=max_num_batched_tokens, **extra)
        except TypeError as exc:
            if not extra:
                raise
            raise self._scheduler_error("it takes no num_lookahead_tokens, so it cannot run a draft model "
                                        "(speculative decoding with [ngram] needs none)") from exc
        self._idle_steps = 0
        self.async_scheduling = runner.overlaps_steps if async_scheduling is None else async_scheduling
        """Queue each step of plain decodes' next decode before taking its tokens in (see :meth:`step`); by
        default where the runner's device runs apart from the host (cuda-paged on a GPU)."""
        self._in_flight: _Launched | None = None
        self.follow_on_steps = 0
        """Steps the engine queued itself, fed from the previous step's draw (async scheduling)."""
        self.eos_token_ids = tuple(tokenizer.eos_token_ids)
        self._groups: dict[str, _Group] = {}
        self._ids = itertools.count()
        self.default_adapter: str | None = None
        """The adapter requests that name none run with (a Modelfile's ADAPTER)."""
        self._generated: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self._mask_pool: Any = None
        import os

        self._overlap_masks = (os.cpu_count() or 1) > torch.get_num_threads()
        self._host.broadcast("enigma_engine_started", engine=self)

    # ------------------------------------------------------------ requests

    def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams | None = None,
                    *, priority: int = 0, arrival_time: float | None = None,
                    prompt_text: str | None = None, adapter: str | None = None) -> str:
        """Queue a prompt (text, or token ids with optional ``prompt_text``); returns its id. ``adapter``
        names a LoRA adapter the model was loaded with (``LLM(..., adapters={name: path})``)."""
        params = params or SamplingParams()
        adapter = adapter if adapter is not None else self.default_adapter
        if adapter is not None:
            self._check_adapter(adapter)
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._groups:
            raise BadRequestError(f"request id {request_id!r} is already in use; ids must be unique")
        if isinstance(prompt, str):
            prompt_text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
        self._check_prompt(token_ids)
        group = _Group(request_id, prompt_text, token_ids, params)
        arrival = time.time() if arrival_time is None else arrival_time
        for index in range(params.n):
            sequence = Sequence(index=index, prompt_token_ids=token_ids, params=params, tokenizer=self.tokenizer,
                                eos_token_ids=self.eos_token_ids, max_model_len=self.max_model_len,
                                device=self.runner.device)
            request = Request(f"{request_id}#{index}" if params.n > 1 else request_id, request_id, sequence,
                              priority=priority, arrival_time=arrival, adapter=adapter,
                              prefix_cache_limit=(None if params.prompt_logprobs is None
                                                  else max(0, params.prompt_logprobs_start - 1)))
            group.requests.append(request)
            group.streamed_tokens.append(0)
            self.scheduler.add_request(request)
        self._groups[request_id] = group
        self._host.broadcast("enigma_request_started", event=RequestStarted(
            request_id=request_id, model=self.model_name, prompt_tokens=len(token_ids), arrival_time=arrival))
        return request_id

    def _check_adapter(self, adapter: str) -> None:
        registry = getattr(self.runner.model, "adapters", None)
        names = list(registry.names()) if registry is not None else []
        if adapter not in names:
            known = ", ".join(names) if names else "none: load the model with adapters={name: folder}"
            raise NotFoundError(f"adapter {adapter!r} is not loaded with this model; its adapters: {known}")

    def _check_prompt(self, token_ids: list[int]) -> None:
        vocab = self.runner.vocab_size
        if not token_ids:
            raise BadRequestError("the prompt is empty after tokenization; give at least one token")
        bad = [t for t in token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise BadRequestError(f"prompt token ids must be integers in [0, {vocab}); got invalid {bad[:5]}")
        if len(token_ids) >= self.max_model_len:
            limit = ("the model's context" if self.max_model_len == self.runner.max_model_len
                     else "what the KV cache can hold for one sequence")
            raise BadRequestError(f"the prompt has {len(token_ids)} tokens but {limit} is {self.max_model_len} "
                                  "tokens; shorten it to leave room for the answer")

    def abort(self, request_id: str) -> None:
        """Stop a prompt's requests now and free their blocks (unknown ids are ignored)."""
        group = self._groups.get(str(request_id))
        if group is None:
            return
        running = [r for r in group.requests if not r.finished]
        for request in running:
            request.sequence.abort()
        self.scheduler.abort(running)
        self._finish_group(group)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------ stepping

    MAX_IDLE_STEPS = 3
    """Consecutive steps a scheduler may schedule nothing while requests wait, before it is called stuck."""

    def step(self, *, delta: bool = False) -> list[RequestOutput]:
        """Run one batched forward; return the outputs of prompts that advanced.

        Outputs are cumulative, or with ``delta`` only the tokens and text new
        since the prompt's previous delta (text that could still become a stop
        string is held back).

        With ``async_scheduling`` a step of plain decodes queues the next decode
        of the same requests, fed from this step's draw on the device, before
        it waits for the draw: the device runs that step while the host takes
        this one's tokens in (appends, stop checks, detokenizing, outputs).
        """
        launched, self._in_flight = self._in_flight, None
        if launched is None:
            output = self.scheduler.schedule()
            if not isinstance(output, SchedulerOutput):
                raise self._scheduler_error(f"schedule() returned a {type(output).__name__}; it must return an "
                                            "enigma.kinds.SchedulerOutput(scheduled=[ScheduledRequest(...), ...])")
            if not output.scheduled:
                self._check_idle()
                return []
            self._idle_steps = 0
            self._check_schedule(output)
            launched = self._launch(output)
        follow_on = self._follow_on(launched)
        if follow_on is not None:
            self._in_flight = self._launch(follow_on[0], input_ids=follow_on[1])
            self.follow_on_steps += 1
        return self._complete(launched, delta=delta)

    def _launch(self, output: SchedulerOutput, *, input_ids: torch.Tensor | None = None) -> _Launched:
        """Queue a step's forward pass and the draw of its sampled rows; nothing waits for the device (except
        the runner's own host work)."""
        started = time.perf_counter()
        decode_only = input_ids is not None or all(item.start + 1 == item.request.num_tokens
                                                   for item in output.scheduled)
        chunks = []
        prompt_logprob_items = set()
        for index, item in enumerate(output.scheduled):
            request = item.request
            group = self._groups[request.group_id]
            wants_prompt_logprobs = (group.prompt_logprobs is not None and request.sequence.index == 0
                                     and item.start < len(request.prompt_token_ids)
                                     and item.start + item.num_tokens >= group.params.prompt_logprobs_start)
            if wants_prompt_logprobs:
                prompt_logprob_items.add(index)
            end, known = item.start + item.num_tokens, request.num_tokens
            tokens = request.token_ids(item.start, min(end, known)) if input_ids is None else [0]
            if end > known:  # drafts to verify follow the sequence's own tokens (a follow-on has none)
                tokens = tokens + list(item.draft_token_ids[max(item.start - known, 0):end - known])
            chunks.append(SequenceChunk(tokens, item.start,
                                        item.block_table, adapter=request.adapter,
                                        all_logits=wants_prompt_logprobs or bool(item.draft_token_ids)))
        pending_masks = self._start_grammar_masks(output)
        # (only follow-ons pass ids: an executor's runner that never overlaps need not take them)
        logits = self.runner.execute(chunks) if input_ids is None else self.runner.execute(chunks, input_ids=input_ids)
        launched = _Launched(output=output, logits=logits, prompt_logprob_items=prompt_logprob_items,
                             started=started, decode_only=decode_only, follows_on=input_ids is not None)
        for index, item in enumerate(output.scheduled):
            if item.draft_token_ids:
                launched.to_verify.append(index)
            elif item.start + item.num_tokens >= item.request.num_tokens:  # a follow-on's token is one ahead
                launched.to_sample.append(index)
        if launched.to_sample:
            rows = [output.scheduled[i].request.sequence.row for i in launched.to_sample]
            masks = pending_masks.result() if pending_masks is not None else None
            launched.draw = start_sample(logits.last[launched.to_sample], rows, masks=masks)
        return launched

    def _complete(self, launched: _Launched, *, delta: bool) -> list[RequestOutput]:
        """Take a launched step's results in: prompt logprobs, drafts verified, sampled tokens appended; the
        scheduler told; the outputs of the prompts that moved. A follow-on step's requests that finished (or
        were aborted) meanwhile are left out: what it computed for them is dropped."""
        output, logits = launched.output, launched.logits
        live = [index for index, item in enumerate(output.scheduled)
                if not (launched.follows_on and item.request.finished)]
        if len(live) < len(output.scheduled):
            output = SchedulerOutput(scheduled=[output.scheduled[index] for index in live])
        for index in launched.prompt_logprob_items:
            item = launched.output.scheduled[index]
            self._add_prompt_logprobs(self._groups[item.request.group_id], item, logits.full[index])

        sampled_ids: dict[str, list[int]] = {}
        rejected: dict[str, int] = {}
        touched: dict[str, _Group] = {}
        now = time.time()
        if launched.draw is not None:
            sampled = launched.draw.result()
            for index, token, entry in zip(launched.to_sample, sampled.token_ids, sampled.logprobs):
                request = launched.output.scheduled[index].request
                if request.finished:  # a follow-on's request that finished before it
                    continue
                if request.first_token_time is None:
                    request.first_token_time = now
                request.sequence.append(token, entry)
                sampled_ids[request.request_id] = [token]
                touched[request.group_id] = self._groups[request.group_id]
        if launched.to_verify:  # never in a follow-on step: the indices are the launched step's
            to_verify, scheduled = launched.to_verify, launched.output.scheduled
            for index, tokens in zip(to_verify, self._verify([scheduled[i] for i in to_verify],
                                                             [logits.full[i] for i in to_verify])):
                item = scheduled[index]
                sampled_ids[item.request.request_id] = tokens
                rejected[item.request.request_id] = item.num_tokens - len(tokens)
                touched[item.request.group_id] = self._groups[item.request.group_id]
        if sampled_ids:
            self._generated.append((now, sum(len(tokens) for tokens in sampled_ids.values())))
        if self.speculator is not None:
            self._speculate(output, sampled_ids, time.perf_counter() - launched.started,
                            decode_only=launched.decode_only)
        self.scheduler.update_from_output(output, ModelRunnerOutput(sampled_token_ids=sampled_ids,
                                                                    num_rejected_drafts=rejected))
        self._check_progress(output)
        outputs = []
        for group in touched.values():
            outputs.append(self._make_output(group, delta=delta))
            if group.finished:
                self._finish_group(group)
        return outputs

    def _follow_on(self, launched: _Launched) -> tuple[SchedulerOutput, torch.Tensor] | None:
        """With async scheduling, the next decode of a step whose every request draws a token — what the
        scheduler's ``follow_on`` makes of it — and the device ids to feed it; None where a request's draw needs
        the host's tokens (drafts, grammars, penalties) or the scheduler must choose afresh."""
        follow_on = getattr(self.scheduler, "follow_on", None)
        if (not self.async_scheduling or follow_on is None or launched.draw is None
                or self.speculator is not None or len(launched.to_sample) != len(launched.output.scheduled)):
            return None
        for item in launched.output.scheduled:
            row = item.request.sequence.row
            if item.draft_token_ids or row.constraint is not None or needs_processing(row):
                return None
        output = follow_on(launched.output)
        if output is None or not output.scheduled:
            return None
        self._check_schedule(output, follow_on=True)
        rows = {item.request.request_id: index for index, item in enumerate(launched.output.scheduled)}
        order = [rows[item.request.request_id] for item in output.scheduled]
        ids = launched.draw.token_ids
        if order != list(range(len(launched.output.scheduled))):
            ids = ids[to_device(order, ids.device)]
        return output, ids

    def _verify(self, items: list[ScheduledRequest], logits: list[torch.Tensor]) -> list[list[int]]:
        """Verify each item's drafts against the target's logits at its ``1 + drafts`` positions (rejection
        sampling, :mod:`enigma.speculative.rejection`); append the emitted tokens to the sequences and
        return them per item (fewer where a sequence finished on the way)."""
        from enigma.sampling import SamplingRow, needs_processing, sampling_probs
        from enigma.speculative.rejection import accept_greedy, verify_drafts

        # greedy requests with nothing to apply to their logits keep their drafts while they equal the argmaxes
        # (one argmax over every such row); the others verify against their sampling distributions
        plain = {index for index, item in enumerate(items)
                 if item.request.sequence.params.greedy and not needs_processing(item.request.sequence.row)}
        plain_best = (torch.cat([logits[index] for index in sorted(plain)]).argmax(dim=-1).tolist() if plain else [])
        rows = []
        for index, item in enumerate(items):
            if index in plain:
                continue
            sequence = item.request.sequence
            drafts = list(item.draft_token_ids)
            for count in range(len(drafts) + 1):
                rows.append(SamplingRow(sequence.params, sequence.prompt_token_ids,
                                        sequence.output_token_ids + drafts[:count], generator=sequence.row.generator,
                                        stop_ids=sequence.row.stop_ids))
        probs = (sampling_probs(torch.cat([logits[i] for i in range(len(items)) if i not in plain]), rows)
                 if rows else None)
        emitted_per_item, first, first_plain = [], 0, 0
        now = time.time()
        for index, (item, item_logits) in enumerate(zip(items, logits)):
            request, sequence = item.request, item.request.sequence
            drafts = list(item.draft_token_ids)
            if index in plain:
                emitted = accept_greedy(plain_best[first_plain:first_plain + len(drafts) + 1], drafts)
                first_plain += len(drafts) + 1
            else:
                draft_probs = request.spec_probs[:len(drafts)] if request.spec_probs is not None else None
                emitted = verify_drafts(probs[first:first + len(drafts) + 1], drafts, draft_probs,
                                        generator=sequence.row.generator, greedy=sequence.params.greedy)
                first += len(drafts) + 1
            raw = torch.log_softmax(item_logits, dim=-1) if sequence.params.logprobs is not None else None
            appended = []
            for position, token in enumerate(emitted):
                entry = top_logprobs(raw[position], token, sequence.params.logprobs) if raw is not None else None
                sequence.append(token, entry)
                appended.append(token)
                if sequence.finished:
                    break
            if request.first_token_time is None:
                request.first_token_time = now
            self.speculator.record_verification(request.request_id, len(drafts), len(emitted) - 1, len(appended))
            emitted_per_item.append(appended)
        return emitted_per_item

    def _speculate(self, output: SchedulerOutput, sampled_ids: dict[str, list[int]], seconds: float, *,
                   decode_only: bool) -> None:
        """Time this step for the speculator's cost model (decode steps only), then draft the next tokens of
        every request that just received one and runs on."""
        items = output.scheduled
        if decode_only:
            self.speculator.record_step(sum(item.num_tokens for item in items), seconds)
        drafting = [item for item in items if item.request.request_id in sampled_ids and not item.request.finished]
        if drafting:
            self.speculator.propose([item.request for item in drafting], [item.block_table for item in drafting],
                                    running=len(items))

    def _start_grammar_masks(self, output: SchedulerOutput) -> Any:
        """Start computing the grammar masks of this step's constrained samples beside the forward pass,
        where a core is free for it (llguidance releases the GIL); a future of
        :func:`enigma.sampling.grammar_masks`, or None (the sampler computes them). Where torch's threads
        take every core, a thread beside them slows the forward more than the masks cost (measured:
        batch 16 on 2 cores, 13.4 → 21.7 ms a step), so they are computed in line."""
        if not self._overlap_masks:
            return None
        rows = [item.request.sequence.row for item in output.scheduled
                if item.start + item.num_tokens == item.request.num_tokens]
        if not any(row.constraint is not None for row in rows):
            return None
        if self._mask_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="enigma-grammar")
        return self._mask_pool.submit(grammar_masks, rows, self.runner.vocab_size)

    # ------------------------------------------------------------ the scheduler's contract

    def _scheduler_error(self, rule: str) -> PluginError:
        impl = self._scheduler_impl
        return PluginError(f"scheduler {impl.name!r} (from {impl.origin}) broke its contract: {rule}; "
                           "see enigma.kinds.Scheduler")

    def _check_idle(self) -> None:
        if not self.scheduler.has_unfinished():
            return
        self._idle_steps += 1
        if self._idle_steps >= self.MAX_IDLE_STEPS:
            self._idle_steps = 0
            raise self._scheduler_error(f"it scheduled nothing for {self.MAX_IDLE_STEPS} steps while "
                                        "has_unfinished() was true, so no request can make progress")

    def _check_schedule(self, output: SchedulerOutput, *, follow_on: bool = False) -> None:
        """The scheduler's contract: known, unfinished requests once each, chunks inside them, block tables
        covering them inside the pool; a follow-on decodes one token where the one being drawn goes."""
        block_size, seen = self.runner.block_size, set()
        for item in output.scheduled:
            request = item.request
            name = f"request {request.request_id!r}"
            if not isinstance(item, ScheduledRequest):
                raise self._scheduler_error(f"schedule() returned {type(item).__name__} items; it must return "
                                            "enigma.kinds.SchedulerOutput(scheduled=[ScheduledRequest(...)])")
            if request.request_id in seen or request.group_id not in self._groups or request.finished:
                raise self._scheduler_error(f"{name} was scheduled twice, or is unknown or finished")
            seen.add(request.request_id)
            if follow_on:
                if item.num_tokens != 1 or item.start != request.num_tokens or item.draft_token_ids:
                    raise self._scheduler_error(
                        f"follow_on() scheduled {name} for {item.num_tokens} tokens from position {item.start}; "
                        f"it must decode one, at position {request.num_tokens} (the token being drawn)")
            elif item.num_tokens < 1 or item.start != request.num_computed_tokens \
                    or item.start + item.num_tokens > request.num_tokens + len(item.draft_token_ids):
                raise self._scheduler_error(
                    f"{name} was scheduled for {item.num_tokens} tokens from position {item.start}, but it has "
                    f"{request.num_tokens} tokens and {request.num_computed_tokens} computed")
            table = item.block_table
            if len(table) * block_size < item.start + item.num_tokens \
                    or (table and (min(table) < 0 or max(table) >= self.num_blocks)):
                raise self._scheduler_error(f"{name}'s block table {list(table)[:8]} does not cover "
                                            f"{item.start + item.num_tokens} tokens in a pool of {self.num_blocks} "
                                            f"blocks of {block_size}")

    def _check_progress(self, output: SchedulerOutput) -> None:
        for item in output.scheduled:
            request = item.request
            if not request.finished and request.num_computed_tokens <= item.start:
                raise self._scheduler_error(f"update_from_output left request {request.request_id!r} at "
                                            f"{request.num_computed_tokens} computed tokens after computing "
                                            f"{item.num_tokens} from {item.start}")

    def _add_prompt_logprobs(self, group: _Group, item: ScheduledRequest, chunk_logits: torch.Tensor) -> None:
        # logits at position p score the prompt token at p + 1
        prompt = item.request.prompt_token_ids
        start = item.start
        logprobs = torch.log_softmax(chunk_logits.float(), dim=-1)
        k, first = group.params.prompt_logprobs, group.params.prompt_logprobs_start
        del group.prompt_logprobs[start + 1:]  # recomputed after a preemption: replace
        group.prompt_logprobs.extend([None] * (start + 1 - len(group.prompt_logprobs)))  # came from the cache
        for offset in range(len(logprobs)):
            position = start + offset + 1
            if position >= len(prompt):
                break
            group.prompt_logprobs.append(None if position < first else with_token_texts(
                top_logprobs(logprobs[offset], prompt[position], k), self.tokenizer))

    def _finish_group(self, group: _Group) -> None:
        if self._groups.pop(group.group_id, None) is None:
            return
        if self.speculator is not None:
            for request in group.requests:
                self.speculator.forget(request.request_id)
        first_times = [r.first_token_time for r in group.requests if r.first_token_time is not None]
        reasons = [r.sequence.finish_reason for r in group.requests]
        self._host.broadcast("enigma_request_finished", event=RequestFinished(
            request_id=group.group_id, model=self.model_name,
            finish_reason="abort" if "abort" in reasons else reasons[0] or "abort",
            prompt_tokens=len(group.prompt_token_ids),
            generation_tokens=sum(len(r.sequence.output_token_ids) for r in group.requests),
            arrival_time=group.requests[0].arrival_time,
            first_token_time=min(first_times) if first_times else None,
            finished_time=time.time(),
            cached_prompt_tokens=group.requests[0].cached_prompt_tokens))

    # ------------------------------------------------------------ outputs

    def _make_output(self, group: _Group, *, delta: bool) -> RequestOutput:
        """The prompt's output so far: cumulative, or (``delta``) only what is new since the last delta."""
        outputs = []
        for index, request in enumerate(group.requests):
            output = request.sequence.to_output()
            if delta:
                seen = group.streamed_tokens[index]
                output = CompletionOutput(index=output.index, text=request.sequence.stream_delta(),
                                          token_ids=output.token_ids[seen:],
                                          cumulative_logprob=output.cumulative_logprob,
                                          logprobs=output.logprobs[seen:] if output.logprobs is not None else None,
                                          finish_reason=output.finish_reason, stop_reason=output.stop_reason)
                group.streamed_tokens[index] = len(request.sequence.output_token_ids)
            outputs.append(output)
        return RequestOutput(request_id=group.group_id, prompt=group.prompt, prompt_token_ids=group.prompt_token_ids,
                             prompt_logprobs=group.prompt_logprobs, outputs=outputs, finished=group.finished)

    # ------------------------------------------------------------ health

    def stats(self) -> dict[str, float]:
        """Counters for health checks and metrics."""
        now = time.time()
        while self._generated and now - self._generated[0][0] > 10.0:
            self._generated.popleft()
        window = now - self._generated[0][0] if len(self._generated) > 1 else 0.0
        tokens = sum(count for _, count in self._generated)
        stats = {**self.scheduler.stats(), **self.cache.stats(),
                 "generation_tokens_per_s": tokens / window if window > 0 else 0.0,
                 "follow_on_steps": float(self.follow_on_steps)}
        if self.speculator is not None:
            stats.update(self.speculator.stats())
        return stats

    def close(self) -> None:
        """Abort everything left and announce the engine stopped."""
        for group_id in list(self._groups):
            self.abort(group_id)
        self._in_flight = None  # its requests are aborted: nothing of it is taken in
        if self._mask_pool is not None:
            self._mask_pool.shutdown(wait=True)
            self._mask_pool = None
        self._host.broadcast("enigma_engine_stopped", engine=self)
        self.runner.close()


__all__ = ["Engine", "RequestStatus"]
