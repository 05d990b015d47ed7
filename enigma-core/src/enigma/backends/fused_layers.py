"""The torch-cpu backend's native decode path: a Llama's layers as one native call per step.

:func:`fuse_llama_layers` looks at a prepared Llama-family model; where every
projection can run natively (a float32 :class:`~enigma.backends.torch_cpu.CPULinear`,
or a module answering ``native_projection()``, such as the ggml plugin's
``GGMLLinear``) it sets ``model.fused_layers`` to a :class:`FusedLlamaLayers`.
The model's forward hands it each step; it runs the steps it can take —
inference, float32 or bfloat16, few rows, each sequence's new tokens no more
than a short chunk (a verification, a short prompt; see
:attr:`FusedLlamaLayers.LONG_CHUNK_WORK`), no adapters — through :class:`~enigma.native.decoder.NativeDecoder`
and gives the others back (None), which then run the torch path, the
reference. A model changed after preparation (a projection wrapped by an
adapter, a forward hook added by tensor parallelism) is seen at the next step
and runs the torch path from then on.

It also drafts: :meth:`FusedLlamaLayers.decode_greedy` feeds each sequence's
argmax back for a number of single-token steps, in one native call that runs
the embedding, the stack, the head and the argmax step after step (a draft
model's steps through the runner spent half their time building metadata and
calling modules).

A bfloat16 model runs with its weights and KV cache in bfloat16, widened as
they are read, and its activations in float32 (torch's bfloat16 path rounds
them to bfloat16 after every operation, so the two agree to bfloat16's
precision, not bit for bit); norms and biases are copied to float32 once.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from enigma.attention import ForwardContext
from enigma.native import NativeKernels
from enigma.native.decoder import NativeDecoder, NativeLayer, NativeProjection

log = logging.getLogger(__name__)


def native_projection(module: Any) -> NativeProjection | None:
    """How the native decoder runs ``module``, or None when it cannot."""
    answer = getattr(module, "native_projection", None)
    return answer() if callable(answer) else None


class FusedLlamaLayers:
    """A prepared Llama's decoder stack for steps the native decoder takes (see the module's doc)."""

    LONG_CHUNK_WORK = 32 * 1024
    """Chunks longer than the backend's short queries (a long verification, a short prompt) still run here
    while their tokens times their context stay under this: the native decoder attends row by row, which
    beats torch's batched attention while contexts are short (enigma-tiny, 17-32 tokens: 1.6-2.8x faster;
    the 110M benchmark model, 32 tokens: 1.2x after 100 tokens, level after 1000) and loses beyond."""

    def __init__(self, model: torch.nn.Module, decoder: NativeDecoder, backend: Any, watched: list[tuple]) -> None:
        self.decoder = decoder
        self.dtype = decoder.cache_dtype
        """The model's dtype: its embeddings arrive in it and its hidden states leave in it."""
        self.backend = backend
        self._watched = watched
        """(dict, key, module) that must still hold: the modules the decoder read its weights from."""
        self._hooked = [module for layer in model.model.layers for module in (layer, layer.self_attn, layer.mlp)]
        self._short = getattr(backend, "SHORT_QUERY_MAX", 16)
        self._windowed = any(layer.self_attn.sliding_window for layer in model.model.layers)
        self._head_cache: tuple[torch.nn.Module, NativeProjection | None] | None = None
        self.enabled = True

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, context: ForwardContext,
                 num_layers: int | None) -> torch.Tensor | None:
        """The hidden states after the final norm, or None: this step runs the torch path."""
        metadata = context.metadata
        if (not self.enabled or context.adapters or x.dtype != self.dtype
                or not 0 < x.shape[0] <= self.decoder.max_rows or metadata.sliding_window is not None
                or any(length > self._short and length * seq_len > self.LONG_CHUNK_WORK
                       for length, seq_len in zip(metadata.query_lens, metadata.seq_lens))):
            return None
        if not self._unchanged():
            log.info("the model changed after preparation (an adapter or a hook): its steps run the torch path")
            self.enabled = False
            return None
        tables, lengths = self.backend.attention_rows(metadata)
        hidden = self.decoder(x.to(torch.float32).contiguous(), positions.to(torch.int64).contiguous(),
                              metadata.slot_mapping, context.kv_caches, tables, lengths, num_layers=num_layers)
        return hidden.to(self.dtype)

    @torch.inference_mode()
    def decode_greedy(self, embed: torch.nn.Module, lm_head: torch.nn.Module, kv_caches: list[torch.Tensor],
                      block_size: int, feeds: list[list[int]], starts: list[int], block_tables: list[list[int]],
                      steps: list[int], *, num_layers: int | None = None) -> list[list[int]] | None:
        """Sequence ``i``'s tokens ``feeds[i]`` fed from position ``starts[i]``, then its argmax fed back,
        until it has ``steps[i]`` argmaxes (the sequences batched, KV written through ``block_tables[i]``);
        each sequence's argmaxes. ``embed`` and ``lm_head`` are the model's. The first step (a feed of
        several tokens) runs from here; the single-token steps after it in one native call
        (:meth:`NativeDecoder.decode_greedy`) where the embedding is a plain table and the head has a native
        kernel, else a native call each. None where the native decoder cannot run them (the caller steps
        the model)."""
        active = [i for i in range(len(feeds)) if steps[i] > 0]
        if (not self.enabled or self._windowed or not 0 < sum(len(feeds[i]) for i in active) <= self.decoder.max_rows
                or any(not feeds[i] for i in active) or not self._unchanged()):
            return None
        chosen: list[list[int]] = [[] for _ in feeds]
        current, positions = [list(feed) for feed in feeds], list(starts)
        width = max(len(block_tables[i]) for i in active)
        padded = {i: block_tables[i] + [0] * (width - len(block_tables[i])) for i in active}
        head, table = self._head(lm_head), getattr(embed, "weight", None)
        in_one_call = (head is not None and isinstance(embed, torch.nn.Embedding) and table is not None
                       and table.dtype in NativeDecoder.CACHE_DTYPES and table.is_contiguous())
        while active:
            left = {steps[i] - len(chosen[i]) for i in active}
            if in_one_call and chosen[active[0]] and len(left) == 1:
                rest = self.decoder.decode_greedy(table, head, [current[i][0] for i in active],
                                                  [positions[i] for i in active],
                                                  torch.tensor([padded[i] for i in active], dtype=torch.int64),
                                                  kv_caches, left.pop(), num_layers=num_layers)
                for i, tokens in zip(active, rest):
                    chosen[i] += tokens
                break
            rows = [(i, positions[i] + offset) for i in active for offset in range(len(current[i]))]
            where = torch.tensor([position for _, position in rows], dtype=torch.int64)
            slots = torch.tensor([block_tables[i][p // block_size] * block_size + p % block_size for i, p in rows],
                                 dtype=torch.int64)
            tables = torch.tensor([padded[i] for i, _ in rows], dtype=torch.int64)
            x = embed(torch.tensor([token for i in active for token in current[i]], dtype=torch.int64))
            hidden = self.decoder(x.to(torch.float32).contiguous(), where, slots, kv_caches, tables, where + 1,
                                  num_layers=num_layers)
            if len(rows) > len(active):  # a first feed of several tokens: the head over each one's last
                ends = torch.tensor([len(current[i]) for i in active]).cumsum(0) - 1
                hidden = hidden[ends]
            best = lm_head(hidden.to(self.dtype)).float().argmax(dim=-1).tolist()
            for i, token in zip(active, best):
                chosen[i].append(token)
                positions[i] += len(current[i])
                current[i] = [token]
            active = [i for i in active if len(chosen[i]) < steps[i]]
        return chosen

    def _head(self, lm_head: torch.nn.Module) -> NativeProjection | None:
        """``lm_head``'s native projection (looked up once per module), or None."""
        if self._head_cache is None or self._head_cache[0] is not lm_head:
            self._head_cache = (lm_head, native_projection(lm_head))
        return self._head_cache[1]

    def _unchanged(self) -> bool:
        return (all(holder.get(key) is module for holder, key, module in self._watched)
                and not any(m._forward_hooks or m._forward_pre_hooks for m in self._hooked))


def fuse_llama_layers(model: torch.nn.Module, native: NativeKernels, backend: Any) -> FusedLlamaLayers | None:
    """Set ``model.fused_layers`` when every layer of ``model`` (a Llama-family model, after
    ``fuse_projections``) can run natively; returns it, or None (the reason logged at debug)."""
    config = getattr(model, "config", None)
    if not hasattr(model, "fused_layers") or config is None:
        return None
    layers, watched = [], []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        qkv = _projections(attention, ("qkv_proj",) if attention.qkv_proj is not None
                           else ("q_proj", "k_proj", "v_proj"), watched)
        gate_up = _projections(mlp, ("gate_up_proj",) if mlp.gate_up_proj is not None
                               else ("gate_proj", "up_proj"), watched)
        o = _projections(attention, ("o_proj",), watched)
        down = _projections(mlp, ("down_proj",), watched)
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        if None in (qkv, gate_up, o, down) or any(n.dtype not in NativeDecoder.CACHE_DTYPES for n in norms):
            log.debug("native decoder not used: a projection or norm of layer %d has no native kernel",
                      attention.layer_index)
            return None
        watched += [(layer._modules, "input_layernorm", layer.input_layernorm),
                    (layer._modules, "post_attention_layernorm", layer.post_attention_layernorm)]
        layers.append(NativeLayer(input_norm=norms[0].detach().float(), post_norm=norms[1].detach().float(),
                                  qkv=qkv, o=o[0], gate_up=gate_up, down=down[0], window=attention.sliding_window))
    final_norm = model.model.norm.weight.detach()
    dtype = final_norm.dtype  # the model's: norms are parameters, cast to it (a packed embedding has no weight)
    if dtype not in NativeDecoder.CACHE_DTYPES or model.inv_freq.dtype != torch.float32:
        return None
    decoder = NativeDecoder(native.library, layers, hidden=config.hidden_size, heads=config.num_heads,
                            kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                            intermediate=config.intermediate_size, eps=config.rms_norm_eps,
                            inv_freq=model.inv_freq.contiguous(), final_norm=final_norm.float(), cache_dtype=dtype)
    fused = FusedLlamaLayers(model, decoder, backend, watched)
    if not fused._unchanged():  # hooked already (a tensor-parallel shard's all-reduces): nothing to fuse
        log.debug("native decoder not used: the model's layers have forward hooks")
        return None
    model.__dict__["fused_layers"] = fused
    return fused


def _projections(owner: torch.nn.Module, names: tuple[str, ...], watched: list[tuple]) -> list[NativeProjection] | None:
    """The native projections of ``owner``'s modules ``names`` (submodules, or fused ones it holds in its
    ``__dict__``), each recorded in ``watched``; None if one has no native kernel."""
    found = []
    for name in names:
        holder = owner.__dict__ if owner.__dict__.get(name) is not None else owner._modules
        module = holder.get(name)
        projection = None if module is None else native_projection(module)
        if projection is None:
            return None
        watched.append((holder, name, module))
        found.append(projection)
    return found
