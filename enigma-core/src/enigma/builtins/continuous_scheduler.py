"""Builtin plugin ``continuous``: continuous batching with chunked prefill and preemption."""

from __future__ import annotations

from enigma import hookimpl


@hookimpl
def enigma_register_schedulers(register):
    register("continuous", "enigma.engine.scheduler:Scheduler", priority=0,
             summary="continuous batching: token budget, chunked prefill, recompute preemption, priorities")
