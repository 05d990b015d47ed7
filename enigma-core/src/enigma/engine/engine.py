"""The engine: requests in, one batched forward per step, outputs out.

``add_request`` validates and queues; ``step`` asks the scheduler for this
step's chunks (prefills, chunked prefills and decodes together), runs them as
one forward pass through the :class:`~enigma.runner.ModelRunner`, samples the
next token of every request whose tokens are all computed, and returns the
outputs of the prompts that moved. Lifecycle events go out through the
plugin host (``enigma_request_started`` / ``_finished``, ``enigma_engine_*``).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Any

import torch

from enigma.engine.request import Request, RequestStatus
from enigma.errors import BadRequestError
from enigma.events import RequestFinished, RequestStarted
from enigma.outputs import CompletionOutput, RequestOutput
from enigma.runner import ModelRunner, SequenceChunk
from enigma.sampling import SamplingParams, sample, top_logprobs
from enigma.sequence import Sequence


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


class Engine:
    """Continuous batching over a paged KV cache for one causal LM.

    The engine owns its runner's KV pool (it sizes it to ``num_blocks``): give
    each engine a runner of its own.
    """

    def __init__(self, runner: ModelRunner, tokenizer: Any, *, model_name: str, num_blocks: int,
                 cache: str = "auto", scheduler: str = "auto", max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, enable_prefix_caching: bool = True, host: Any = None) -> None:
        if host is None:
            from enigma.plugins import get_host

            host = get_host()
        self._host = host
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_name = model_name
        runner.resize(num_blocks)
        block_size = runner.block_size
        self.max_model_len = min(runner.max_model_len, num_blocks * block_size)
        self.cache = host.create("cache", cache, num_blocks=num_blocks, block_size=block_size,
                                 max_model_len=self.max_model_len, enable_prefix_caching=enable_prefix_caching)
        self.scheduler = host.create("scheduler", scheduler, cache=self.cache, max_num_seqs=max_num_seqs,
                                     max_num_batched_tokens=max_num_batched_tokens)
        self.eos_token_ids = tuple(tokenizer.eos_token_ids)
        self._groups: dict[str, _Group] = {}
        self._ids = itertools.count()
        self._generated: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self._host.broadcast("enigma_engine_started", engine=self)

    # ------------------------------------------------------------ requests

    def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams | None = None,
                    *, priority: int = 0, arrival_time: float | None = None,
                    prompt_text: str | None = None) -> str:
        """Queue a prompt (text, or token ids with optional ``prompt_text``); returns its id."""
        params = params or SamplingParams()
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
                              priority=priority, arrival_time=arrival,
                              skip_prefix_cache=params.prompt_logprobs is not None)
            group.requests.append(request)
            group.streamed_tokens.append(0)
            self.scheduler.add_request(request)
        self._groups[request_id] = group
        self._host.broadcast("enigma_request_started", event=RequestStarted(
            request_id=request_id, model=self.model_name, prompt_tokens=len(token_ids), arrival_time=arrival))
        return request_id

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
        self.scheduler.abort(r for r in group.requests if not r.finished)
        self._finish_group(group)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------ stepping

    def step(self, *, delta: bool = False) -> list[RequestOutput]:
        """Run one batched forward; return the outputs of prompts that advanced.

        Outputs are cumulative, or with ``delta`` only the tokens and text new
        since the prompt's previous delta (text that could still become a stop
        string is held back).
        """
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        chunks = []
        token_lists = [item.request.all_token_ids() for item in scheduled]  # once per step: O(context)
        for item, tokens in zip(scheduled, token_lists):
            request = item.request
            start = request.num_computed_tokens
            group = self._groups[request.group_id]
            wants_prompt_logprobs = (group.prompt_logprobs is not None and request.sequence.index == 0
                                     and start < len(request.prompt_token_ids))
            chunks.append(SequenceChunk(tokens[start:start + item.num_tokens], start,
                                        self.cache.block_table(request.request_id),
                                        all_logits=wants_prompt_logprobs))
        logits = self.runner.execute(chunks)

        to_sample: list[int] = []
        for index, item in enumerate(scheduled):
            request = item.request
            if index in logits.full:
                self._add_prompt_logprobs(self._groups[request.group_id], request, logits.full[index])
            request.num_computed_tokens += item.num_tokens
            self.cache.commit(request.request_id, token_lists[index][: request.num_computed_tokens])
            if request.num_computed_tokens == request.num_tokens:
                to_sample.append(index)

        touched: dict[str, _Group] = {}
        if to_sample:
            requests = [scheduled[i].request for i in to_sample]
            sampled = sample(logits.last[to_sample], [r.sequence.row for r in requests])
            now = time.time()
            self._generated.append((now, len(requests)))
            for request, token, entry in zip(requests, sampled.token_ids, sampled.logprobs):
                if request.first_token_time is None:
                    request.first_token_time = now
                request.sequence.append(token, entry)
                if request.sequence.finished:
                    self.scheduler.finish(request)
                touched[request.group_id] = self._groups[request.group_id]
        outputs = []
        for group in touched.values():
            outputs.append(self._make_output(group, delta=delta))
            if group.finished:
                self._finish_group(group)
        return outputs

    def _add_prompt_logprobs(self, group: _Group, request: Request, chunk_logits: torch.Tensor) -> None:
        # logits at position p score the prompt token at p + 1
        prompt = request.prompt_token_ids
        start = request.num_computed_tokens
        logprobs = torch.log_softmax(chunk_logits.float(), dim=-1)
        k = group.params.prompt_logprobs
        del group.prompt_logprobs[start + 1:]  # recomputed after a preemption: replace
        for offset in range(len(logprobs)):
            position = start + offset + 1
            if position >= len(prompt):
                break
            row = top_logprobs(logprobs[offset], prompt[position], k)
            group.prompt_logprobs.append({tid: type(lp)(lp.logprob, lp.rank, self.tokenizer.decode(
                [tid], skip_special_tokens=False)) for tid, lp in row.items()})

    def _finish_group(self, group: _Group) -> None:
        if self._groups.pop(group.group_id, None) is None:
            return
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
        return {**self.scheduler.stats(), **self.cache.stats(),
                "generation_tokens_per_s": tokens / window if window > 0 else 0.0}

    def close(self) -> None:
        """Abort everything left and announce the engine stopped."""
        for group_id in list(self._groups):
            self.abort(group_id)
        self._host.broadcast("enigma_engine_stopped", engine=self)


__all__ = ["Engine", "RequestStatus"]
