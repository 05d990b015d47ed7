"""enigma-plugin-cuda-paged: enigma on NVIDIA GPUs.

The backend ``cuda-paged`` (:mod:`~enigma_cuda_paged.backend`) runs attention
as Triton kernels that read the paged KV cache in place
(:mod:`~enigma_cuda_paged.kernels`); ``auto`` chooses it where torch sees a
CUDA device and Triton is installed.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``). There the backend accepts
    the CPU, and the kernel multiplies bfloat16 in float32: Triton 3.9's interpreter gets a bfloat16 ``tl.dot``
    wrong (errors of 1e10 on a 16x16 product)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
