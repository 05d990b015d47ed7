"""The ``cuda-paged`` backend: the torch backend with Triton paged attention, on an NVIDIA GPU.

Models, weights and the KV layout are the reference backend's; what changes is
attention: every step — prefill chunks, decodes and drafts being verified
together — runs one Triton kernel per layer that reads each sequence's KV
blocks where they lie (:mod:`enigma_cuda_paged.kernels`). The kernel's
per-step tables are built once per step and uploaded in one copy; the layers
share them. Decode-only steps replay CUDA graphs (:mod:`enigma_cuda_paged.graphs`).
The KV pool takes what ``gpu_memory_utilization`` (0.9 by default) leaves once
the weights are in, and holds the model's dtype or, with ``kv_cache_dtype``,
8-bit floats (twice bf16's tokens). Settings: ``[plugins.cuda-paged]``
(:class:`~enigma_cuda_paged.settings.CudaPagedSettings`).

With ``TRITON_INTERPRET=1`` and no GPU it also runs on the CPU, slowly, which is
how its tests check it on machines without one.
"""

from __future__ import annotations

from typing import Any

import torch

from enigma.attention import AttentionMetadata
from enigma.backends.torch_backend import TorchBackend, write_kv
from enigma.errors import BadRequestError
from enigma_cuda_paged import interpreted, kernels
from enigma_cuda_paged.graphs import DecodeGraphs


class CudaPagedBackend(TorchBackend):
    """Runs models on one CUDA device with paged-attention kernels.

    An instance keeps the current step's kernel tables: it serves one engine,
    stepping in one thread.
    """

    name = "cuda-paged"

    def __init__(self, *, device: str | torch.device | None = None) -> None:
        if device is None:  # the interpreter without a GPU runs on the CPU
            device = "cpu" if interpreted() and not torch.cuda.is_available() else "cuda"
        device = torch.device(device)
        if device.type != "cuda" and not (device.type == "cpu" and interpreted()):
            raise BadRequestError(f"backend 'cuda-paged' runs on a CUDA device, not on {device}; choose backend "
                                  "'torch-cpu' or 'torch' for that device (the CPU runs it only under "
                                  "TRITON_INTERPRET=1, for tests)")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BadRequestError("backend 'cuda-paged' needs a CUDA device and torch finds none; choose backend "
                                  "'torch-cpu' on this machine")
        super().__init__(device=device)
        from enigma.config import plugin_settings

        self.settings = plugin_settings("cuda-paged")
        self.kv_dtype = fp8_dtype(self.settings.kv_cache_dtype, self.device)
        self._tables: tuple[torch.Tensor, int, kernels.StepTables] | None = None

    @property
    def overlaps_steps(self) -> bool:
        """On a GPU (and unless ``async_scheduling`` is off) the engine queues a step of plain decodes' next
        decode before taking its tokens in: the GPU computes while the host works."""
        return self.device.type == "cuda" and self.settings.async_scheduling

    def kv_cache_memory(self, requested: int | float | None) -> int:
        """Bytes for the KV pool: ``requested`` bytes (an int) or share of the free memory (a float in (0, 1]);
        by default what ``gpu_memory_utilization`` of the device's memory leaves once the weights (and anything
        else on the device) are in."""
        if requested is not None or self.device.type != "cuda":
            return super().kv_cache_memory(requested)
        utilization = self.settings.gpu_memory_utilization
        free, total = torch.cuda.mem_get_info(self.device)
        budget = int(total * utilization) - (total - free)
        if budget <= 0:
            raise BadRequestError(f"the GPU has {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB, no room "
                                  f"for a KV pool within gpu_memory_utilization={utilization} of it; raise it "
                                  "(enigma config set plugins.cuda-paged.gpu_memory_utilization 0.95), give "
                                  "kv_cache_memory in bytes, or free the device")
        return budget

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int) -> tuple[int, ...]:
        """The torch backend's layout, with one spare block after the pool's: the padding rows of
        graph-replayed decodes write there."""
        return super().kv_cache_shape(num_blocks + 1, block_size, num_kv_heads, head_dim)

    def kv_cache_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The model's ``dtype``, or the fp8 type that ``kv_cache_dtype`` names."""
        return self.kv_dtype or dtype

    def step_runner(self, runner: Any) -> DecodeGraphs | None:
        """What runs ``runner``'s decode-only steps: CUDA graphs on the GPU (unless ``cuda_graphs`` is off); on a
        CPU, under the interpreter, the same static buffers without capture."""
        if not self.settings.cuda_graphs:
            return None
        return DecodeGraphs(runner, self, max_batch=self.settings.max_graph_batch,
                            capture=self.device.type == "cuda")

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                  kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        """Write this step's KV into ``kv_cache``, then attend with the paged kernel. See
        :class:`enigma.kinds.Backend`."""
        write_kv(kv_cache, key, value, metadata.slot_mapping)
        tables = self.step_tables(metadata, group=query.shape[1] // kv_cache.shape[1], kv_heads=kv_cache.shape[1])
        return kernels.paged_attention(query, kv_cache, metadata.block_tables, tables, scale=scale,
                                       sliding_window=metadata.sliding_window)

    def step_tables(self, metadata: AttentionMetadata, *, group: int, kv_heads: int) -> kernels.StepTables:
        """The kernel's tables for this step, made by the first layer that asks. A layer with its own sliding
        window gets a copy of the metadata sharing the step's block tables, so those identify the step."""
        cached = self._tables
        if cached is None or cached[0] is not metadata.block_tables or cached[1] not in (group, None):
            tables = kernels.step_tables(metadata.query_lens, metadata.seq_lens, group=group, device=self.device,
                                         kv_heads=kv_heads)
            self._tables = cached = (metadata.block_tables, group, tables)
        return cached[2]

    def use_step_tables(self, metadata: AttentionMetadata, tables: kernels.StepTables) -> None:
        """Make ``tables`` the ones every layer of steps over ``metadata``'s block tables reads: a graph's
        static tables, which hold the step's lengths on the device (made for the model's group, so any)."""
        self._tables = (metadata.block_tables, None, tables)


FP8_TYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def fp8_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The fp8 type ``kv_cache_dtype`` names (None for ``auto``), refused where the GPU cannot convert it."""
    if name == "auto":
        return None
    dtype = FP8_TYPES[name]
    if dtype == torch.float8_e4m3fn and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise BadRequestError(f"kv_cache_dtype={name} (e4m3) needs an NVIDIA GPU of compute capability 8.9 or "
                                  f"later (Ada, Hopper); this one is {capability[0]}.{capability[1]}: use "
                                  "fp8_e5m2 (enigma config set plugins.cuda-paged.kv_cache_dtype fp8_e5m2) or auto")
    return dtype
