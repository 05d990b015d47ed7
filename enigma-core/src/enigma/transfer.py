"""Host-to-device copies that do not wait for the device.

``torch.tensor(values, device="cuda")`` copies from pageable memory and then
synchronizes the stream, so a step's host code that makes a small index
tensor waits for every kernel queued before it — the steps the engine queues
ahead (async scheduling) would stall behind the one still running.
:func:`to_device` copies from pinned memory, asynchronously, instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def to_device(values: Any, device: torch.device | str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``values`` (a list, or a numpy array) as a tensor on ``device``, without waiting for the device."""
    tensor = torch.from_numpy(values) if isinstance(values, np.ndarray) else torch.tensor(values, dtype=dtype)
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    if torch.device(device).type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)
