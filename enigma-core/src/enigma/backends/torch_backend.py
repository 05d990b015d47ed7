"""The reference backend: plain PyTorch on CPU or CUDA.

Attention reads each sequence's keys and values from the paged KV cache by
gathering its blocks, then runs ``scaled_dot_product_attention``. Decode-only
steps (one new token per sequence) run as one padded batch; steps with
prefills run sequence by sequence. Faster kernels that read blocks in place
belong to plugins such as cuda-paged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from enigma.attention import AttentionMetadata


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store this step's keys and values at their cache slots."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor,
              length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``length`` cached keys and values of one sequence, ``[length, kv_heads, dim]``."""
    blocks = kv_cache[:, block_table]  # [2, n_blocks, block_size, kv_heads, dim]
    flat = blocks.flatten(1, 2)[:, :length]
    return flat[0], flat[1]


class TorchBackend:
    """Runs models with PyTorch on one device (``cuda`` when present, else ``cpu``)."""

    name = "torch"

    def __init__(self, *, device: str | torch.device | None = None) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)

    def prepare(self, model: torch.nn.Module, *, dtype: torch.dtype) -> torch.nn.Module:
        """Move ``model`` to this backend's device, parameters in ``dtype``, in eval mode.

        Buffers keep their dtype: RoPE frequencies stay float32.
        """
        model = model.to(device=self.device)
        for param in model.parameters():
            if param.dtype != dtype:
                param.data = param.data.to(dtype)
        return model.eval()

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                  kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        """Write this step's KV into ``kv_cache``, then attend. See :class:`enigma.kinds.Backend`."""
        write_kv(kv_cache, key, value, metadata.slot_mapping)
        if metadata.is_decode_only:
            return self._decode(query, kv_cache, metadata, scale)
        outputs = []
        start = 0
        for index, (query_len, seq_len) in enumerate(zip(metadata.query_lens, metadata.seq_lens)):
            keys, values = gather_kv(kv_cache, metadata.block_tables[index], seq_len)
            mask = _causal_mask(query_len, seq_len, metadata.sliding_window, query.device)
            outputs.append(_sdpa(query[start:start + query_len], keys, values, mask, scale))
            start += query_len
        return torch.cat(outputs, dim=0)

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                scale: float) -> torch.Tensor:
        # One query per sequence: gather every sequence's blocks into a padded
        # batch [num_seqs, max_len, kv_heads, dim] and mask the padding.
        max_len = max(metadata.seq_lens)
        num_blocks = -(-max_len // metadata.block_size)
        blocks = kv_cache[:, metadata.block_tables[:, :num_blocks]]  # [2, seqs, blocks, bs, h, d]
        keys = blocks[0].flatten(1, 2)[:, :max_len]
        values = blocks[1].flatten(1, 2)[:, :max_len]
        lengths = torch.tensor(metadata.seq_lens, device=query.device)
        positions = torch.arange(max_len, device=query.device)
        visible = positions[None, :] < lengths[:, None]
        if metadata.sliding_window is not None:
            visible &= positions[None, :] >= (lengths[:, None] - metadata.sliding_window)
        out = F.scaled_dot_product_attention(
            query.unsqueeze(2),               # [seqs, heads, 1, dim]
            keys.transpose(1, 2),             # [seqs, kv_heads, len, dim]
            values.transpose(1, 2),
            attn_mask=visible[:, None, None, :],
            scale=scale,
            enable_gqa=query.shape[1] != keys.shape[2],
        )
        return out.squeeze(2)


def _causal_mask(query_len: int, seq_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """``[query_len, seq_len]`` bool mask: the queries are the last ``query_len`` positions."""
    query_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    key_pos = torch.arange(seq_len, device=device)[None, :]
    mask = key_pos <= query_pos
    if window is not None:
        mask &= key_pos > query_pos - window
    return mask


def _sdpa(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
          scale: float) -> torch.Tensor:
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1),     # [heads, q_len, dim]
        keys.transpose(0, 1),      # [kv_heads, len, dim]
        values.transpose(0, 1),
        attn_mask=mask,
        scale=scale,
        enable_gqa=query.shape[1] != keys.shape[1],
    )
    return out.transpose(0, 1)     # [q_len, heads, dim]
