"""The reference backend ``torch``: plain PyTorch on any device torch supports.

Short on purpose — the semantics every backend must reproduce: write the
step's keys and values into the paged cache at their slots, then, sequence
by sequence, gather its blocks and attend with ``scaled_dot_product_attention``
(causal, with a sliding window where the layer has one). Fast paths live in
other backends: ``torch-cpu`` (enigma-core) on CPUs, GPU kernels that walk
block tables in plugins such as cuda-paged.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from enigma.attention import AttentionMetadata
from enigma.errors import BadRequestError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
"""The 8-bit float types a KV cache may be stored in."""


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """One layer's cache: ``[2 (k, v), kv_heads, num_blocks, block_size, head_dim]``.

    Head-major, so that a sequence's keys for one head are rows of one matrix:
    the decode matmuls read them without a transposing copy.
    """
    return (2, num_kv_heads, num_blocks, block_size, head_dim)


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store this step's keys and values (``[tokens, kv_heads, dim]``) at their cache slots. An fp8 cache
    takes them saturated to its largest finite value (a plain cast would make out-of-range values NaN)."""
    _, kv_heads, num_blocks, block_size, head_dim = kv_cache.shape
    flat = kv_cache.view(2, kv_heads, num_blocks * block_size, head_dim)
    key, value = key.transpose(0, 1), value.transpose(0, 1)
    if kv_cache.dtype in FP8_DTYPES:
        # saturate, then copy the bytes: index_copy_ has no fp8 kernels
        largest = torch.finfo(kv_cache.dtype).max
        key, value = (part.clamp(-largest, largest).to(kv_cache.dtype).view(torch.uint8) for part in (key, value))
        flat = flat.view(torch.uint8)
    flat[0].index_copy_(1, slot_mapping, key.to(flat.dtype))
    flat[1].index_copy_(1, slot_mapping, value.to(flat.dtype))


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor,
              length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``length`` cached keys and values of one sequence, ``[kv_heads, length, dim]`` each."""
    block_size = kv_cache.shape[3]
    blocks = kv_cache.index_select(2, block_table[: -(-length // block_size)])
    flat = blocks.flatten(2, 3)[:, :, :length]
    return flat[0], flat[1]


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point parameters of ``model`` to ``dtype``, in place.

    What every backend's ``prepare`` must honour: buffers (RoPE frequencies,
    a quantizer's scales), integer tensors (packed weights) and everything
    inside a module that sets ``keeps_dtype = True`` stay exactly as loaded.
    """
    if getattr(model, "keeps_dtype", False):
        return
    for param in model.parameters(recurse=False):
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    for child in model.children():
        cast_parameters(child, dtype)


class TorchBackend:
    """Runs models with PyTorch on one device (``cuda`` when present, else ``cpu``)."""

    name = "torch"

    DEFAULT_CPU_KV_FRACTION = 0.1
    DEFAULT_CPU_KV_CAP = 4 << 30
    DEFAULT_GPU_KV_FRACTION = 0.8
    """Of the device memory still free once the weights are loaded."""

    def __init__(self, *, device: str | torch.device | None = None) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int) -> tuple[int, ...]:
        """See :func:`kv_cache_shape`."""
        return kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)

    def prepare(self, model: torch.nn.Module, *, dtype: torch.dtype) -> torch.nn.Module:
        """Move ``model`` to this backend's device, floating-point parameters in ``dtype``, in eval mode.

        See :func:`cast_parameters`: buffers, integer and packed tensors keep
        their dtype. Models that can (Llama) run plain q/k/v and gate/up
        projections as one matmul each (``fuse_projections``).
        """
        model = model.to(device=self.device)
        cast_parameters(model, dtype)
        fuse = getattr(model, "fuse_projections", None)
        if fuse is not None:
            fuse()
        return model.eval()

    def kv_cache_memory(self, requested: int | float | None) -> int:
        """Bytes for the KV pool: ``requested`` bytes (an int), a fraction in (0, 1] of this
        device's free memory (a float), or by default: on CUDA 80 % of what is free once the
        weights are in, on CPU a tenth of the machine's memory, at most 4 GiB."""
        if isinstance(requested, float) and not 0 < requested <= 1:
            raise BadRequestError(f"kv_cache_memory={requested} is invalid: give bytes (an integer) or a "
                                  "fraction of the device's free memory in (0, 1]")
        if isinstance(requested, int) and not isinstance(requested, bool):
            return requested
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * (requested or self.DEFAULT_GPU_KV_FRACTION))
        if requested is None:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            return min(int(total * self.DEFAULT_CPU_KV_FRACTION), self.DEFAULT_CPU_KV_CAP)
        return int(_available_host_memory() * requested)

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                  kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        """Write this step's KV into ``kv_cache``, then attend. See :class:`enigma.kinds.Backend`."""
        write_kv(kv_cache, key, value, metadata.slot_mapping)
        outputs, start = [], 0
        for index, (query_len, seq_len) in enumerate(zip(metadata.query_lens, metadata.seq_lens)):
            keys, values = gather_kv(kv_cache, metadata.block_tables[index], seq_len)
            outputs.append(attend_one(query[start:start + query_len], keys, values, metadata.sliding_window,
                                      scale))
            start += query_len
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _available_host_memory() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the machine's free pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def attend_one(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, window: int | None,
                scale: float) -> torch.Tensor:
    """Causal attention of one sequence's last ``len(query)`` positions over ``keys``/``values``."""
    query_len, seq_len = query.shape[0], keys.shape[1]
    if query_len == 1 and window is None:
        return decode_one(query, keys, values, scale)
    mask = None
    is_causal = False
    if window is not None and seq_len > 1:
        mask = causal_mask(query_len, seq_len, window, query.device)
    elif query_len == seq_len:
        is_causal = query_len > 1
    elif query_len > 1:
        mask = causal_mask(query_len, seq_len, None, query.device)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1),     # [heads, q_len, dim]
        keys, values,              # [kv_heads, len, dim]
        attn_mask=mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=query.shape[1] != keys.shape[0],
    )
    return out.transpose(0, 1)     # [q_len, heads, dim]


def decode_one(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """One query over all of a sequence's keys, heads grouped onto their KV head.

    A handful of kernels instead of SDPA's general path, which dominates a
    decode step's overhead on CPU.
    """
    heads, dim = query.shape[1], query.shape[2]
    kv_heads = keys.shape[0]
    grouped = query.view(kv_heads, heads // kv_heads, dim)                # [kv, group, dim]
    scores = torch.matmul(grouped, keys.transpose(1, 2)).mul_(scale)     # [kv, group, len]
    out = torch.matmul(scores.softmax(dim=-1), values)                   # [kv, group, dim]
    return out.view(1, heads, dim)


def causal_mask(query_len: int, seq_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """``[query_len, seq_len]`` bool mask: the queries are the last ``query_len`` positions."""
    query_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    key_pos = torch.arange(seq_len, device=device)[None, :]
    mask = key_pos <= query_pos
    if window is not None:
        mask &= key_pos > query_pos - window
    return mask
