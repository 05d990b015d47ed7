"""Where no GPU is, the cuda-paged kernels run under Triton's interpreter on the CPU.

``TRITON_INTERPRET`` is read when a kernel is defined, so it is set here, before
any test imports the plugin's kernels. GPU-only tests carry ``@pytest.mark.gpu``.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="the cuda-paged kernels are Triton kernels; pip install triton")



@pytest.fixture(scope="session")
def device() -> str:
    """Where these tests run the backend: the GPU when there is one, else the CPU through the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"
