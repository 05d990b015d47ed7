"""What generation returns: vLLM's offline-API shapes."""

from __future__ import annotations

import attrs

from enigma.sampling import Logprob

TokenLogprobs = dict[int, Logprob]


@attrs.define(kw_only=True)
class CompletionOutput:
    """One completion of a prompt."""

    index: int
    text: str = ""
    token_ids: list[int] = attrs.field(factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprobs] | None = None
    """Per generated token: ``{token_id: Logprob}`` with the top entries and the chosen token."""
    finish_reason: str | None = None
    """"stop" (EOS, stop string or stop token) or "length"; None while running."""
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended it, if one did."""

    def finished(self) -> bool:
        return self.finish_reason is not None


@attrs.define(kw_only=True)
class RequestOutput:
    """A prompt and its completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """None for the first prompt token, then ``{token_id: Logprob}`` per token."""
    outputs: list[CompletionOutput]
    finished: bool = False


@attrs.frozen
class EmbeddingOutput:
    embedding: list[float]


@attrs.frozen(kw_only=True)
class EmbeddingRequestOutput:
    """One input's embedding."""

    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
