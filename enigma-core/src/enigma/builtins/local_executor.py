"""Builtin plugin ``local``: the executor that runs the model in this process."""

from __future__ import annotations

from enigma import hookimpl


@hookimpl
def enigma_register_executors(register):
    register("local", "enigma.runner:LocalExecutor", summary="the model runs in this process")
