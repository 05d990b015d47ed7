"""enigma-plugin-cuda-paged's hooks: the ``cuda-paged`` backend."""

from __future__ import annotations

import importlib.util

from enigma import Availability, hookimpl
from enigma_cuda_paged import interpreted


def cuda_paged_availability() -> Availability:
    """Available with Triton and a CUDA device; under ``TRITON_INTERPRET=1`` without one, only by name (the
    kernels then run on the CPU, slowly: for tests)."""
    if importlib.util.find_spec("triton") is None:
        return Availability.no("Triton is not installed: pip install triton (torch's CUDA wheels bring it)")
    import torch

    if torch.cuda.is_available():
        return Availability.yes()
    if interpreted():
        return Availability.yes(auto=False, reason="no CUDA device: Triton's interpreter runs the kernels on the "
                                                   "CPU (slowly, for tests); choose it by name")
    return Availability.no("no CUDA device found (torch.cuda.is_available() is false); use backend 'torch-cpu'")


@hookimpl
def enigma_register_backends(register):
    register("cuda-paged", "enigma_cuda_paged.backend:CudaPagedBackend", priority=100, devices=("cuda",),
             available=cuda_paged_availability,
             summary="NVIDIA GPUs: Triton paged attention over the KV blocks in place, one kernel for "
                     "prefills and decodes")


@hookimpl
def enigma_plugin_settings():
    from enigma_cuda_paged.settings import CudaPagedSettings

    return CudaPagedSettings
