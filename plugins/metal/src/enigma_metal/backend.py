"""The ``metal`` backend: the reference torch backend on an Apple GPU (torch's MPS device).

Attention is the reference backend's — the step's keys and values written at
their slots, each sequence's blocks gathered, then SDPA — which MPS runs as
Metal kernels. What differs from CUDA is memory: Apple GPUs share the
machine's memory, so the KV pool's default is a share of what Metal
recommends for one process, less what torch already holds there.
"""

from __future__ import annotations

import torch

from enigma.backends.torch_backend import TorchBackend
from enigma.errors import BadRequestError


class MetalBackend(TorchBackend):
    """Runs models on the MPS device in float16 or bfloat16 (float32 works too, at twice the memory)."""

    name = "metal"

    DEFAULT_KV_FRACTION = 0.5
    """Of the memory Metal recommends for this process that torch does not hold yet once the weights are in."""

    def __init__(self, *, device: str | torch.device | None = None) -> None:
        device = torch.device(device or "mps")
        if device.type != "mps":
            raise BadRequestError(f"backend 'metal' runs on the MPS device, not on {device}; choose backend "
                                  "'torch-cpu' or 'torch' for that device")
        if not torch.backends.mps.is_available():
            raise BadRequestError("backend 'metal' needs torch's MPS device (macOS on Apple silicon), which this "
                                  "machine does not have; choose backend 'torch-cpu'")
        super().__init__(device=device)

    def kv_cache_memory(self, requested: int | float | None) -> int:
        """Bytes for the KV pool: ``requested`` bytes (an int), a share in (0, 1] of the memory Metal still
        offers this process (a float), or :attr:`DEFAULT_KV_FRACTION` of it."""
        if requested is not None and not (isinstance(requested, float) and 0 < requested <= 1):
            return super().kv_cache_memory(requested)  # bytes as given, or the error naming a bad fraction
        free = torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
        return max(0, int(free * (requested or self.DEFAULT_KV_FRACTION)))
