"""One completion in progress: tokens, text, logprobs and when it stops.

A :class:`Sequence` takes each sampled token, extends its text through the
incremental detokenizer and decides whether it is finished: EOS (unless
``ignore_eos``; never before ``min_tokens``), a stop token id, a stop string
(cut from the text unless ``include_stop_str_in_output``), a guided
grammar that is complete, ``max_tokens`` or the model's context length. For streaming, :meth:`Sequence.stream_delta`
holds back text that could still become a stop string, so stop strings never
leak into a stream.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf

import torch

from enigma.detokenizer import IncrementalDetokenizer
from enigma.outputs import CompletionOutput, TokenLogprobs
from enigma.sampling import SamplingParams, SamplingRow, make_generator, with_token_texts


class Sequence:
    """State of one completion (one of a request's ``n``)."""

    def __init__(self, *, index: int, prompt_token_ids: SequenceOf[int], params: SamplingParams,
                 tokenizer: object, eos_token_ids: SequenceOf[int], max_model_len: int,
                 device: torch.device | str = "cpu") -> None:
        self.index = index
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.output_token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.max_model_len = max_model_len
        self._eos = frozenset(eos_token_ids)
        self._tokenizer = tokenizer
        self._detokenizer = IncrementalDetokenizer(tokenizer, self.prompt_token_ids,
                                                   skip_special_tokens=params.skip_special_tokens)
        self._text = ""
        self._streamed = 0
        seed = None if params.seed is None else params.seed + index
        self.constraint = None
        if params.guided_decoding is not None:
            from enigma.guided import GrammarConstraint

            self.constraint = GrammarConstraint(params.guided_decoding, tokenizer, self._eos)
        self.row = SamplingRow(params, self.prompt_token_ids, self.output_token_ids,
                               generator=make_generator(seed, device),
                               stop_ids=self._eos | frozenset(params.stop_token_ids), constraint=self.constraint)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def max_num_tokens(self) -> int:
        """The most tokens (prompt + output) this sequence can reach: ``max_tokens`` or the context."""
        if self.params.max_tokens is None:
            return self.max_model_len
        return min(len(self.prompt_token_ids) + self.params.max_tokens, self.max_model_len)

    @property
    def text(self) -> str:
        return self._text

    def append(self, token_id: int, logprobs: TokenLogprobs | None = None) -> None:
        """Add a sampled token and update text and finish state."""
        assert not self.finished, "append to a finished sequence"
        params = self.params
        self.output_token_ids.append(token_id)
        if logprobs is not None and self.logprobs is not None:
            logprobs = with_token_texts(logprobs, self._tokenizer)
            self.logprobs.append(logprobs)
            self.cumulative_logprob += logprobs[token_id].logprob
        generated = len(self.output_token_ids)

        if token_id in self._eos and not params.ignore_eos and generated >= params.min_tokens:
            self._finish("stop", None)
            return
        if token_id in params.stop_token_ids and generated >= params.min_tokens:
            self._finish("stop", token_id)
            return
        if self.constraint is not None:
            self.constraint.advance(token_id)
        previous = len(self._text)
        self._text += self._detokenizer.add(token_id)
        if params.stop and generated >= params.min_tokens and self._check_stop_strings(previous):
            return
        if self.constraint is not None and self.constraint.complete:
            self._finish("stop", None)
            return
        out_of_budget = params.max_tokens is not None and generated >= params.max_tokens
        if out_of_budget or self.num_tokens >= self.max_model_len:
            self._finish("length", None)

    def _check_stop_strings(self, previous: int) -> bool:
        longest = max(len(stop) for stop in self.params.stop)
        search_from = max(0, previous - longest + 1)
        best: tuple[int, str] | None = None
        for stop in self.params.stop:
            at = self._text.find(stop, search_from)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return False
        at, stop = best
        self._text = self._text[: at + len(stop)] if self.params.include_stop_str_in_output else self._text[:at]
        self._finish("stop", stop, flush=False)
        return True

    def _finish(self, reason: str, stop_reason: str | int | None, *, flush: bool = True) -> None:
        if flush:
            self._text += self._detokenizer.flush()
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def abort(self) -> None:
        """End it early (client gone, engine stopping)."""
        if not self.finished:
            self._finish("abort", None)

    def stream_delta(self) -> str:
        """Text not yet streamed that is safe to show now.

        While running, the tail that could still grow into a stop string is
        held back; once finished, everything left is released.
        """
        safe = len(self._text)
        if not self.finished and self.params.stop:
            safe -= max(len(stop) for stop in self.params.stop) - 1
        if safe <= self._streamed:
            return ""
        delta = self._text[self._streamed:safe]
        self._streamed = safe
        return delta

    def to_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self._text,
            token_ids=list(self.output_token_ids),
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )
