"""BERT encoders for embedding models (all-MiniLM, bge, e5 ... in BERT form).

An encoder attends in both directions over a padded batch and keeps no KV
cache, so it calls ``scaled_dot_product_attention`` itself rather than the
backend's paged attention (which is causal, for decoders). Pooling follows
the sentence-transformers folder: ``modules.json`` and
``1_Pooling/config.json`` (cls / mean / max / mean-sqrt-len), then an
optional ``Normalize`` module.

References: Devlin et al. 2019 (BERT); Reimers & Gurevych 2019
(Sentence-BERT); transformers' ``modeling_bert.py`` for checkpoint names.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from enigma.errors import ConfigError

POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len")


@attrs.frozen(kw_only=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> BertConfig:
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(f"config.json position_embedding_type "
                              f"{config['position_embedding_type']!r} is not supported; only 'absolute'")
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            max_position_embeddings=config.get("max_position_embeddings", 512),
            type_vocab_size=config.get("type_vocab_size", 2),
            layer_norm_eps=config.get("layer_norm_eps", 1e-12),
            hidden_act=config.get("hidden_act", "gelu"),
        )


_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        x = x + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)
        self.num_heads = config.num_heads

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        head_dim = hidden // self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.num_heads, head_dim).transpose(1, 2)  # [b, h, len, d]

        out = F.scaled_dot_product_attention(
            heads(self.self.query(x)), heads(self.self.key(x)), heads(self.self.value(x)),
            attn_mask=mask[:, None, None, :], scale=1 / math.sqrt(head_dim),
        )
        out = out.transpose(1, 2).reshape(batch, length, hidden)
        return self.output.LayerNorm(self.output.dense(out) + x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)
        self.activation = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        hidden = self.activation(self.intermediate.dense(x))
        return self.output.LayerNorm(self.output.dense(hidden) + x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))


class BertModel(nn.Module):
    """A BERT encoder returning token states; :func:`pool` turns them into embeddings."""

    CHECKPOINT_PREFIXES = ("bert.",)
    """Prefixes some checkpoints (e.g. BertForMaskedLM) put before these names."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        if config.hidden_act not in _ACTIVATIONS:
            raise ConfigError(f"config.json hidden_act {config.hidden_act!r} is not supported; "
                              f"supported: {', '.join(_ACTIVATIONS)}")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> BertModel:
        return cls(BertConfig.from_hf(hf_config))

    def post_materialize(self) -> None:
        """BERT has no tied weights or computed buffers."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[batch, len]`` ids and 0/1 mask -> token states ``[batch, len, hidden]``."""
        mask = attention_mask.bool()
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


@attrs.frozen
class Pooling:
    """How token states become one vector (sentence-transformers' Pooling + Normalize)."""

    mode: str = "mean"
    normalize: bool = False

    def __call__(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(states.dtype)[..., None]      # [b, len, 1]
        if self.mode == "cls":
            pooled = states[:, 0]
        elif self.mode == "max":
            pooled = states.masked_fill(mask == 0, float("-inf")).amax(dim=1)
        else:
            summed = (states * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            pooled = summed / (counts if self.mode == "mean" else counts.sqrt())
        return F.normalize(pooled, p=2, dim=-1) if self.normalize else pooled
