"""Megatron-style tensor parallelism for the Llama family: each rank holds 1/N of every layer.

Rank ``r`` of ``N`` keeps attention heads ``[r·H/N, (r+1)·H/N)`` and the KV
heads they read (q/k/v split by output rows, biases with them; ``o_proj``
split by input columns), MLP columns ``[r·I/N, (r+1)·I/N)`` (gate/up by rows,
down by columns), and vocabulary rows ``[r·V', (r+1)·V')`` of the embeddings
and the LM head (``V' = ⌈V/N⌉``, the last shard padded). Attention and MLP
outputs are partial sums: one all-reduce after each block makes them whole;
the embedding lookup is one more, and the main rank gathers the logits. The
KV cache of a rank holds its KV heads only.

The weights are plain tensors and the collectives torch.distributed's
(``all_reduce``, ``gather``), not DTensors: the backend keeps running its own
kernels over the shards (fused q/k/v, the native CPU Linear and attention),
where DTensor's parallel styles would add dispatch per op to every decode
step and not see modules a backend swapped in.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from enigma.errors import ConfigError


def check_divisible(config: object, size: int) -> None:
    """An error naming the numbers when ``size`` ranks cannot split the model's heads and MLP."""
    heads, kv_heads = config.num_heads, config.num_kv_heads
    if heads % size or kv_heads % size:
        raise ConfigError(f"tensor_parallel_size {size} must divide the model's {heads} attention heads and "
                          f"{kv_heads} KV heads; choose a size that divides both")
    if config.intermediate_size % size:
        raise ConfigError(f"tensor_parallel_size {size} must divide the model's MLP width "
                          f"{config.intermediate_size}; choose a size that divides it")


def check_shardable(model: nn.Module, size: int) -> None:
    """Refuse, by name, what this sharding plan does not split."""
    from enigma.models.llama import LlamaForCausalLM

    if not isinstance(model, LlamaForCausalLM):
        raise ConfigError(f"tensor parallelism splits Llama-family models (Llama, Mistral, Qwen2); this model is "
                          f"{type(model).__name__}")
    if getattr(model, "adapters", None) is not None:
        raise ConfigError("tensor parallelism does not serve LoRA adapters yet; merge the adapter "
                          "(enigma lora merge) or serve on one process")
    for name, module in model.named_modules():
        if name.endswith(("_proj", "lm_head")) and type(module) is not nn.Linear:
            raise ConfigError(f"tensor parallelism splits plain weights; {name} is a {type(module).__name__} "
                              "(a quantized model): serve it on one process")
    check_divisible(model.config, size)


def _rows(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return tensor[start:stop].clone()


def _columns(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return tensor[:, start:stop].clone()


def _replace(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    linear.out_features, linear.in_features = weight.shape


def shard_llama(model: nn.Module, rank: int, size: int) -> nn.Module:
    """Cut ``model`` (a loaded :class:`~enigma.models.llama.LlamaForCausalLM`) to rank ``rank``'s shard, in
    place; the whole tensors are released. Collectives run in the default process group."""
    check_shardable(model, size)
    config = model.config
    head_dim = config.head_dim
    heads, kv_heads = config.num_heads // size, config.num_kv_heads // size
    width = config.intermediate_size // size
    q = slice(rank * heads * head_dim, (rank + 1) * heads * head_dim)
    kv = slice(rank * kv_heads * head_dim, (rank + 1) * kv_heads * head_dim)
    mlp = slice(rank * width, (rank + 1) * width)
    with torch.no_grad():
        for layer in model.model.layers:
            attention, block = layer.self_attn, layer.mlp
            for linear, part in ((attention.q_proj, q), (attention.k_proj, kv), (attention.v_proj, kv),
                                 (block.gate_proj, mlp), (block.up_proj, mlp)):
                _replace(linear, _rows(linear.weight, part.start, part.stop),
                         None if linear.bias is None else _rows(linear.bias, part.start, part.stop))
            for linear, part in ((attention.o_proj, q), (block.down_proj, mlp)):
                bias = linear.bias  # added once: on rank 0, zero elsewhere
                _replace(linear, _columns(linear.weight, part.start, part.stop),
                         None if bias is None else (bias.clone() if rank == 0 else torch.zeros_like(bias)))
            attention.num_heads, attention.num_kv_heads = heads, kv_heads
            attention.q_size, attention.kv_size = heads * head_dim, kv_heads * head_dim
            attention.register_forward_hook(all_reduce_output)
            block.register_forward_hook(all_reduce_output)
        shard_vocabulary(model, rank, size)
    model.config = attrs.evolve(config, num_heads=heads, num_kv_heads=kv_heads, intermediate_size=width)
    return model


def shard_vocabulary(model: nn.Module, rank: int, size: int) -> None:
    """The embeddings and the LM head by vocabulary rows (tied ones stay one tensor)."""
    vocab = model.config.vocab_size
    per_rank = math.ceil(vocab / size)
    start, stop = rank * per_rank, min(vocab, (rank + 1) * per_rank)

    def padded_rows(weight: torch.Tensor) -> torch.Tensor:
        rows = torch.zeros(per_rank, weight.shape[1], dtype=weight.dtype, device=weight.device)
        rows[: max(0, stop - start)] = weight[start:stop]
        return rows

    embedding = VocabParallelEmbedding(padded_rows(model.model.embed_tokens.weight), start)
    model.model.embed_tokens = embedding
    if model.config.tie_word_embeddings:
        model.lm_head.weight = embedding.weight
    else:
        model.lm_head.weight = nn.Parameter(padded_rows(model.lm_head.weight), requires_grad=False)
    model.lm_head.out_features = per_rank


def all_reduce_output(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the block's partial sums, summed over the ranks."""
    dist.all_reduce(output)
    return output


class VocabParallelEmbedding(nn.Module):
    """The embedding rows ``[start, start + rows)``; ids outside them look up zeros, and an all-reduce
    gives every rank the whole embedding."""

    def __init__(self, weight: torch.Tensor, start: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start = start

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        dist.all_reduce(out)
        return out


class ShardedCausalLM(nn.Module):
    """A rank's shard as the runner sees a model: the same forward, logits whole on the main rank."""

    def __init__(self, shard: nn.Module, *, rank: int, size: int) -> None:
        super().__init__()
        self.shard = shard
        self.rank, self.size = rank, size
        self.config = shard.config

    @property
    def num_layers(self) -> int:
        return self.shard.num_layers

    @property
    def kv_shape(self) -> tuple[int, int]:
        return self.shard.kv_shape

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, context: object, **kwargs: object
                ) -> torch.Tensor:
        return self.shard(input_ids, positions, context, **kwargs)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[n, vocab]`` float32 logits on rank 0 (gathered from every rank's rows); a rank's own rows
        elsewhere."""
        local = self.shard.compute_logits(hidden).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(local, parts, dst=0)
        if self.rank != 0:
            return local
        return torch.cat(parts, dim=-1)[:, : self.config.vocab_size]
