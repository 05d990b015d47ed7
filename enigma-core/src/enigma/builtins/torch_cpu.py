"""Builtin plugin ``torch-cpu``: the torch backend with enigma's CPU fast paths."""

from __future__ import annotations

from enigma import Availability, hookimpl


def _cpu_only() -> Availability:
    import torch

    if torch.cuda.is_available():
        return Availability.yes(auto=False, reason="this machine has a CUDA device, which 'auto' prefers; "
                                                   "name torch-cpu or --device cpu to run on the CPU")
    return Availability.yes()


@hookimpl
def enigma_register_backends(register):
    register("torch-cpu", "enigma.backends.torch_cpu:TorchCPUBackend", priority=10, available=_cpu_only,
             devices=("cpu",),
             summary="CPU: native streaming matmul and paged decode attention (compiled on first use), "
                     "KV read in place")
