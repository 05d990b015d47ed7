"""enigma-plugin-metal's hooks: the ``metal`` backend."""

from __future__ import annotations

import platform

from enigma import Availability, hookimpl


def metal_availability() -> Availability:
    """Available where torch's MPS device is (macOS on Apple silicon); elsewhere it says why not."""
    import torch

    if torch.backends.mps.is_available():
        return Availability.yes()
    if platform.system() != "Darwin":
        return Availability.no(f"Apple GPUs are reached through torch's MPS device, which exists only on macOS; "
                               f"this is {platform.system()}: use backend 'torch-cpu' (or 'cuda-paged' on NVIDIA)")
    if not torch.backends.mps.is_built():
        return Availability.no("this torch was built without MPS; install torch's macOS wheel from PyPI")
    return Availability.no("torch finds no MPS device (it needs Apple silicon or an AMD GPU and macOS 12.3 or "
                           "newer); use backend 'torch-cpu'")


@hookimpl
def enigma_register_backends(register):
    register("metal", "enigma_metal.backend:MetalBackend", priority=100, available=metal_availability,
             devices=("mps",),
             summary="Apple GPUs through torch's MPS device: float16/bfloat16, paged attention with torch ops")
