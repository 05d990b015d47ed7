"""Attention for training: whole sequences at once, causal, differentiable.

Training runs the same model code as inference; only the attention differs.
Instead of a paged KV cache, each forward pass sees ``batch`` sequences of
``seq_len`` tokens laid out back to back in the flat batch, and attends
causally within each sequence with PyTorch's fused scaled-dot-product kernel.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from enigma.attention import ForwardContext


@attrs.frozen
class TrainingBatchLayout:
    """``batch`` sequences of ``seq_len`` tokens each (the model's metadata for one pass)."""

    batch: int
    seq_len: int
    sliding_window: int | None = None


class TrainingAttention:
    """The attention a :class:`~enigma.attention.ForwardContext` calls during training."""

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                  kv_cache: object, metadata: TrainingBatchLayout, scale: float) -> torch.Tensor:
        batch, seq_len = metadata.batch, metadata.seq_len
        heads, kv_heads = query.shape[1], key.shape[1]
        q, k, v = (t.view(batch, seq_len, t.shape[1], t.shape[2]).transpose(1, 2) for t in (query, key, value))
        if metadata.sliding_window is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                 enable_gqa=heads != kv_heads)
        else:
            position = torch.arange(seq_len, device=query.device)
            distance = position[:, None] - position[None, :]
            mask = (distance >= 0) & (distance < metadata.sliding_window)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                 enable_gqa=heads != kv_heads)
        return out.transpose(1, 2).reshape(batch * seq_len, heads, query.shape[2])


def training_context(num_layers: int, batch: int, seq_len: int) -> ForwardContext:
    """A forward context for ``batch`` x ``seq_len`` tokens with no KV cache."""
    return ForwardContext(backend=TrainingAttention(), metadata=TrainingBatchLayout(batch, seq_len),
                          kv_caches=[None] * num_layers)


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over ``[batch, seq_len + 1]`` blocks, and the number of targets.

    Inputs are each block's first ``seq_len`` tokens; targets its labels shifted by one
    (``IGNORE_INDEX`` targets carry no loss).
    """
    inputs, targets = input_ids[:, :-1], labels[:, 1:]
    batch, seq_len = inputs.shape
    positions = torch.arange(seq_len, device=inputs.device).repeat(batch)
    context = training_context(model.num_layers, batch, seq_len)
    hidden = model(inputs.reshape(-1), positions, context)
    logits = model.compute_logits(hidden)
    flat_targets = targets.reshape(-1)
    count = int((flat_targets != -100).sum())
    loss = F.cross_entropy(logits, flat_targets, ignore_index=-100, reduction="sum") / max(count, 1)
    return loss, count
