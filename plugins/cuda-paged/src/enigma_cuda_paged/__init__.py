"""enigma-plugin-cuda-paged: enigma on NVIDIA GPUs.

The backend ``cuda-paged`` (:mod:`~enigma_cuda_paged.backend`) runs attention
as Triton kernels that read the paged KV cache in place
(:mod:`~enigma_cuda_paged.kernels`); ``auto`` chooses it where torch sees a
CUDA device and Triton is installed.
"""

from __future__ import annotations

__version__ = "0.1.0"
