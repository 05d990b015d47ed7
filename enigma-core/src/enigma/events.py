"""Lifecycle events that observers (metrics, logging) receive through hooks.

The engine builds one of these and calls the matching ``enigma_*`` lifecycle
hook with it. Events are frozen: observers read, never change.
"""

from __future__ import annotations

import attrs


@attrs.frozen(kw_only=True)
class RequestStarted:
    """A request was accepted by an engine."""

    request_id: str
    model: str
    prompt_tokens: int
    arrival_time: float
    """``time.time()`` when the request arrived."""


@attrs.frozen(kw_only=True)
class RequestFinished:
    """A request left an engine: finished, stopped, aborted or failed."""

    request_id: str
    model: str
    finish_reason: str
    """"stop", "length", "abort" or "error"."""
    prompt_tokens: int
    generation_tokens: int
    arrival_time: float
    first_token_time: float | None
    """``time.time()`` of the first generated token; None if none was."""
    finished_time: float
    cached_prompt_tokens: int = 0
    """Prompt tokens served from the prefix cache rather than computed."""

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from arrival to the first token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float:
        """Seconds from arrival to finish."""
        return self.finished_time - self.arrival_time

    @property
    def mean_inter_token_latency(self) -> float | None:
        """Mean seconds between generated tokens after the first."""
        if self.first_token_time is None or self.generation_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (self.generation_tokens - 1)
