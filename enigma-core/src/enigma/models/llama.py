"""The Llama family: Llama 2/3/3.x, TinyLlama, SmolLM, Mistral, Qwen2.

One decoder-only transformer covers them all: RMSNorm, RoPE (with linear or
llama3 scaling), SwiGLU MLP, grouped-query attention, optional q/k/v biases
(Qwen2), tied or untied embeddings, per-layer sliding windows (Mistral, Qwen2).

The model runs on a flat batch: ``input_ids`` and ``positions`` are
``[num_tokens]`` holding every scheduled sequence's new tokens back to back;
attention is the backend's, reading and writing the paged KV cache described
by the :class:`~enigma.attention.ForwardContext`.

Every module carries its checkpoint name (``q_proj``, ``k_proj``, ``v_proj``,
``gate_proj``, ``up_proj``...), so the model's state dict is the checkpoint's:
a quantizer can give ``v_proj`` another format than ``q_proj`` and an adapter
can wrap ``q_proj`` alone. A backend may still run q/k/v and gate/up as one
matmul each (:meth:`LlamaForCausalLM.fuse_projections`) where all of them are
plain Linears: the fused weight is one tensor and the per-projection
parameters become views of it, so the names stay and no memory is added.

References: Touvron et al. 2023 (Llama 2), Dubey et al. 2024 (Llama 3),
Jiang et al. 2023 (Mistral 7B), Qwen2 technical report; transformers'
``modeling_llama.py`` for checkpoint names and numerics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from enigma.attention import ForwardContext
from enigma.models.base import checkpoint_tensors
from enigma.models.rope import apply_rotary, cos_sin, inverse_frequencies


@attrs.frozen(kw_only=True)
class LlamaConfig:
    """The fields of a Hugging Face config.json this family uses."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_windows: tuple[int | None, ...]
    """Each layer's sliding window, or None for full attention."""

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> LlamaConfig:
        architecture = config["architectures"][0]
        heads = config["num_attention_heads"]
        layers = config["num_hidden_layers"]
        rope = dict(config.get("rope_parameters") or {})
        scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
        is_qwen2 = architecture == "Qwen2ForCausalLM"
        return cls(
            architecture=architecture,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            qkv_bias=is_qwen2 or config.get("attention_bias", False),
            o_bias=(not is_qwen2) and config.get("attention_bias", False),
            mlp_bias=config.get("mlp_bias", False),
            sliding_windows=_sliding_windows(config, architecture, layers),
        )


def _sliding_windows(config: dict[str, Any], architecture: str, layers: int) -> tuple[int | None, ...]:
    window = config.get("sliding_window")
    if not window:
        return (None,) * layers
    if config.get("layer_types"):
        return tuple(window if kind == "sliding_attention" else None for kind in config["layer_types"])
    if architecture == "Qwen2ForCausalLM":
        if not config.get("use_sliding_window", False):
            return (None,) * layers
        first = config.get("max_window_layers", layers)
        return tuple(window if index >= first else None for index in range(layers))
    return (window,) * layers


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel; same math as below in float32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.sliding_window = config.sliding_windows[layer_index]
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.q_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        self.scale = self.head_dim ** -0.5
        self.__dict__["qkv_proj"] = None  # set by fuse_projections; not a submodule (not in the state dict)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                context: ForwardContext) -> torch.Tensor:
        tokens = x.shape[0]
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
            qk = apply_rotary(qkv[:, : self.num_heads + self.num_kv_heads], cos, signed_sin)  # q and k in one go
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            v = qkv[:, self.num_heads + self.num_kv_heads:]
        else:
            q = apply_rotary(self.q_proj(x).view(tokens, self.num_heads, self.head_dim), cos, signed_sin)
            k = apply_rotary(self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim), cos, signed_sin)
            v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        out = context.backend.attention(
            q, k, v,
            kv_cache=context.kv_caches[self.layer_index],
            metadata=context.metadata_for(self.sliding_window),
            scale=self.scale,
        )                                                   # [tokens, heads, head_dim]
        return self.o_proj(out.reshape(tokens, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.__dict__["gate_up_proj"] = None  # set by fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_index: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_index)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                context: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, signed_sin, context)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM over a flat, paged batch."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.empty(config.head_dim // 2), persistent=False)
        self.checkpointed_layers: frozenset[int] = frozenset()
        """Layers whose activations are recomputed in the backward pass instead of kept (training)."""
        self.__dict__["fused_layers"] = None
        """A backend's runner of the whole decoder stack (torch-cpu's native decoder), called in inference
        as ``fused_layers(embeddings, positions, context, num_layers)``: the hidden states after the
        final norm, or None for a step it does not take. Not a submodule."""
        self.post_materialize()

    def post_materialize(self) -> None:
        """Tie the head to the embeddings (when configured) and compute the buffers
        that checkpoints do not hold; needed again after ``to_empty`` from meta."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if self.inv_freq.is_meta:  # computed after materializing; meta math would load torch's compiler
            return
        config = self.config
        with torch.device(self.inv_freq.device):
            self.inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> LlamaForCausalLM:
        return cls(LlamaConfig.from_hf(hf_config))

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(num_kv_heads, head_dim) of each layer's cache."""
        return self.config.num_kv_heads, self.config.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                context: ForwardContext, *, num_layers: int | None = None) -> torch.Tensor:
        """Hidden states ``[num_tokens, hidden]`` after the final norm; with ``num_layers``, of the
        first that many layers only (a self-draft for speculative decoding)."""
        x = self.model.embed_tokens(input_ids)
        if self.fused_layers is not None and not torch.is_grad_enabled():
            hidden = self.fused_layers(x, positions, context, num_layers)
            if hidden is not None:
                return hidden
        cos, signed_sin = cos_sin(positions, self.inv_freq, x.dtype)
        recompute = self.checkpointed_layers if torch.is_grad_enabled() else ()
        layers = self.model.layers if num_layers is None else self.model.layers[:num_layers]
        for index, layer in enumerate(layers):
            if index in recompute:
                x = checkpoint(layer, x, cos, signed_sin, context, use_reentrant=False)
            else:
                x = layer(x, cos, signed_sin, context)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, vocab]`` in float32 for the given hidden states."""
        return self.lm_head(hidden).float()

    def decode_greedy(self, kv_caches: list[torch.Tensor], block_size: int, feeds: list[list[int]],
                      starts: list[int], block_tables: list[list[int]], steps: list[int], *,
                      num_layers: int | None = None) -> list[list[int]] | None:
        """Greedy steps in one go where the backend fused the layers
        (:meth:`enigma.backends.fused_layers.FusedLlamaLayers.decode_greedy`); None elsewhere."""
        if self.fused_layers is None or torch.is_grad_enabled():
            return None
        return self.fused_layers.decode_greedy(self.model.embed_tokens, self.lm_head, kv_caches, block_size,
                                               feeds, starts, block_tables, steps, num_layers=num_layers)

    def fuse_projections(self, wrap: Callable[[nn.Linear], nn.Module] = lambda linear: linear) -> int:
        """Run each layer's q/k/v, and gate/up, as one matmul where they are all plain ``nn.Linear``s.

        The fused weight is one tensor; the projections' parameters become views
        of it (same names, no extra memory). ``wrap`` turns the fused Linear into
        the module that runs it (a backend's kernel choice). Projections a
        transform replaced stay unfused, unless all of them are of one class
        with a ``fuse(parts)`` class method, which returns the fused module (or
        None when these parts cannot be fused). Returns how many groups were
        fused. For inference only: training must see the parts.
        """
        with torch.no_grad():
            return self._fuse(wrap)

    def _fuse(self, wrap: Callable[[nn.Linear], nn.Module]) -> int:
        fused = 0
        for layer in self.model.layers:
            for owner, names, attribute in ((layer.self_attn, ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
                                            (layer.mlp, ("gate_proj", "up_proj"), "gate_up_proj")):
                parts = [getattr(owner, name) for name in names]
                fuse = getattr(type(parts[0]), "fuse", None)  # a packed Linear that knows how (GGMLLinear)
                if fuse is not None and all(type(p) is type(parts[0]) for p in parts):
                    module = fuse(parts)
                    if module is not None:
                        owner.__dict__[attribute] = module
                        fused += 1
                    continue
                if not _fusable(parts):
                    continue
                linear = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts),
                                   bias=parts[0].bias is not None, device="meta")
                linear.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
                if parts[0].bias is not None:
                    linear.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
                start = 0
                for part in parts:
                    rows = slice(start, start + part.out_features)
                    part.weight.data = linear.weight.data[rows]
                    if part.bias is not None:
                        part.bias.data = linear.bias.data[rows]
                    start += part.out_features
                owner.__dict__[attribute] = wrap(linear)
                fused += 1
        return fused

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The weights under their Hugging Face checkpoint names (a tied head
        omitted, as transformers saves it)."""
        return checkpoint_tensors(self, skip=("lm_head.weight",) if self.config.tie_word_embeddings else ())


def _fusable(parts: list[nn.Module]) -> bool:
    first = parts[0]
    return (all(type(p) is nn.Linear for p in parts)
            and all(p.weight.dtype == first.weight.dtype and p.weight.device == first.weight.device
                    and (p.bias is None) == (first.bias is None) for p in parts))
