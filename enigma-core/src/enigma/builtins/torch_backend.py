"""Builtin plugin ``torch``: the reference backend (PyTorch on CPU or CUDA)."""

from __future__ import annotations

from enigma import hookimpl


@hookimpl
def enigma_register_backends(register):
    register(
        "torch",
        "enigma.backends.torch_backend:TorchBackend",
        priority=0,
        summary="reference PyTorch backend: gather and SDPA on any device torch runs (CUDA when present)",
    )
