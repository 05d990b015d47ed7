"""A decoder stack run by ``enigma_decode_layers``: every layer of a step in one native call.

In torch a Llama layer is some twenty operator calls, each ≈ 10 µs of
dispatch and Python whatever its size; for a small model at batch 1 that is
most of the step (enigma-tiny's math takes a fraction of a millisecond). The
native call does the whole stack — norms, projections, rotary, the KV write,
paged attention, SwiGLU, residuals, the final norm — for a few rows, with the
matmuls behind function pointers so that a plugin's kernels (the ggml
plugin's GGUF block products) run inside it.

A module joins by answering ``native_projection()`` with a
:class:`NativeProjection` (or None when it cannot this time): the address of a
C function with ``enigma_qmatmul``'s signature::

    int fn(int kind, const void *weight, int64_t out, int64_t in, const float *x, int64_t rows,
           uint8_t *scratch, float *y, int threads)

which computes ``y[rows, out] = x[rows, in] @ Wᵀ`` (no bias; the caller adds it)
and returns nonzero for what it refuses. The structures here mirror
``kernels.c``'s ``enigma_projection``, ``enigma_layer`` and ``enigma_decoder``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import attrs
import torch


@attrs.frozen(kw_only=True)
class NativeProjection:
    """How the native decoder runs one Linear: a C matmul and the tensors it reads."""

    function: int
    """Address of the C matmul (``enigma_qmatmul``'s signature)."""
    weight: torch.Tensor
    """What the function reads as ``weight`` (kept alive by the decoder)."""
    in_features: int
    out_features: int
    bias: torch.Tensor | None = None
    kind: int = 0
    """The function's own tag (ggml's type number for the block kernels)."""
    scratch_bytes_per_row: int = 0
    """Scratch the function needs per row of ``x`` (quantized activations)."""
    max_rows: int = 32
    """Above this many rows the function is no longer the best way to run this Linear."""


@attrs.frozen(kw_only=True)
class NativeLayer:
    """One decoder layer for :class:`NativeDecoder`: its two norms' weights and its projections."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Sequence[NativeProjection]
    """One fused ``[q; k; v]`` projection, or q, k and v."""
    o: NativeProjection
    gate_up: Sequence[NativeProjection]
    """One fused ``[gate; up]`` projection, or gate and up."""
    down: NativeProjection
    window: int | None = None


class _Projection(ctypes.Structure):
    _fields_ = [("fn", ctypes.c_void_p), ("weight", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("kind", ctypes.c_int64), ("out", ctypes.c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("qkv", _Projection * 3),
                ("o", _Projection), ("gate_up", _Projection * 2), ("down", _Projection),
                ("n_qkv", ctypes.c_int64), ("n_gate_up", ctypes.c_int64), ("window", ctypes.c_int64)]


class _Decoder(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_int64), ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64),
                ("head_dim", ctypes.c_int64), ("intermediate", ctypes.c_int64), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("inv_freq", ctypes.c_void_p), ("final_norm", ctypes.c_void_p),
                ("cache_bf16", ctypes.c_int64)]


ERRORS = {1: "a matmul kernel refused its input", 2: "a cache slot lies outside the KV pool",
          3: "a block table is shorter than its length or names a block outside the KV pool",
          4: "a token lies outside the vocabulary"}


class NativeDecoder:
    """A Llama-style decoder stack (RMSNorm, rotary in the halves layout, grouped-query attention
    over the paged cache, SwiGLU) as one call of the native library per step.

    Float32 activations; float32 or bfloat16 caches (``cache_dtype``: a bfloat16
    model's cache is bfloat16). The tensors given are read in place and kept
    alive here: whoever replaces a layer's weights builds a new decoder.
    """

    CACHE_DTYPES = (torch.float32, torch.bfloat16)

    def __init__(self, library: ctypes.CDLL, layers: Sequence[NativeLayer], *, hidden: int, heads: int,
                 kv_heads: int, head_dim: int, intermediate: int, eps: float, inv_freq: torch.Tensor,
                 final_norm: torch.Tensor | None, cache_dtype: torch.dtype = torch.float32) -> None:
        if cache_dtype not in self.CACHE_DTYPES:
            raise ValueError(f"native decoder: caches of {cache_dtype} are not supported (float32 or bfloat16)")
        self.cache_dtype = cache_dtype
        self._function = library.enigma_decode_layers
        self._function.restype = ctypes.c_int
        self._function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                   ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        self._greedy = library.enigma_decode_greedy
        self._greedy.restype = ctypes.c_int
        self._greedy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                 ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                 ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                 ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_int]
        scratch_floats = library.enigma_decoder_scratch_floats
        scratch_floats.restype = ctypes.c_int64
        scratch_floats.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        self.num_layers = len(layers)
        self.hidden = hidden
        self._keep: list[torch.Tensor] = [inv_freq]
        for tensor in (inv_freq, final_norm):
            if tensor is not None:
                _check_float32(tensor, "a norm or the rotary frequencies")
        self._decoder = _Decoder(hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                 intermediate=intermediate, eps=eps, scale=head_dim ** -0.5,
                                 inv_freq=inv_freq.data_ptr(),
                                 final_norm=None if final_norm is None else final_norm.data_ptr(),
                                 cache_bf16=int(cache_dtype == torch.bfloat16))
        if final_norm is not None:
            self._keep.append(final_norm)
        self._layers = (_Layer * len(layers))()
        projections: list[NativeProjection] = []
        for index, layer in enumerate(layers):
            self._layers[index] = self._layer(layer, hidden=hidden, q=heads * head_dim, kv=kv_heads * head_dim,
                                              intermediate=intermediate)
            projections += [*layer.qkv, layer.o, *layer.gate_up, layer.down]
        self.max_rows = min(p.max_rows for p in projections)
        """The most rows a step may have to run here (the projections' kernels' limit)."""
        scratch_bytes = max(p.scratch_bytes_per_row for p in projections)
        self._scratch = torch.empty(scratch_floats(ctypes.byref(self._decoder), self.max_rows), dtype=torch.float32)
        self._qscratch = torch.empty(max(1, scratch_bytes * self.max_rows), dtype=torch.uint8)
        self._caches: tuple[tuple[int, ...], ctypes.Array] | None = None

    def _layer(self, layer: NativeLayer, *, hidden: int, q: int, kv: int, intermediate: int) -> _Layer:
        for norm in (layer.input_norm, layer.post_norm):
            _check_float32(norm, "a norm")
        self._keep += [layer.input_norm, layer.post_norm]
        if not ([p.out_features for p in layer.qkv] in ([q + 2 * kv], [q, kv, kv])
                and [p.out_features for p in layer.gate_up] in ([2 * intermediate], [intermediate, intermediate])
                and all(p.in_features == hidden for p in (*layer.qkv, *layer.gate_up))
                and (layer.o.in_features, layer.o.out_features) == (q, hidden)
                and (layer.down.in_features, layer.down.out_features) == (intermediate, hidden)):
            raise ValueError("native decoder: a layer's projections do not have the model's shapes")
        qkv = (_Projection * 3)(*(self._projection(p) for p in layer.qkv))
        gate_up = (_Projection * 2)(*(self._projection(p) for p in layer.gate_up))
        return _Layer(input_norm=layer.input_norm.data_ptr(), post_norm=layer.post_norm.data_ptr(), qkv=qkv,
                      o=self._projection(layer.o), gate_up=gate_up, down=self._projection(layer.down),
                      n_qkv=len(layer.qkv), n_gate_up=len(layer.gate_up), window=layer.window or 0)

    def _projection(self, projection: NativeProjection) -> _Projection:
        if not projection.weight.is_contiguous():
            raise ValueError("native decoder: a projection's weight is not contiguous")
        self._keep.append(projection.weight)
        if projection.bias is not None:
            _check_float32(projection.bias, "a bias")
            self._keep.append(projection.bias)
        return _Projection(fn=projection.function, weight=projection.weight.data_ptr(),
                           bias=None if projection.bias is None else projection.bias.data_ptr(),
                           kind=projection.kind, out=projection.out_features)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, kv_caches: Sequence[torch.Tensor],
                 tables: torch.Tensor, lengths: torch.Tensor, *, num_layers: int | None = None) -> torch.Tensor:
        """The hidden states after the stack (and the final norm) for ``x`` ``[rows, hidden]``, the
        embeddings of tokens at ``positions``; each row's key and value go to cache slot ``slots[r]``,
        and row ``r`` attends over the first ``lengths[r]`` positions of the blocks in ``tables[r]``.
        ``x`` is used as scratch. All int64 but ``x``, contiguous, on CPU; at most :attr:`max_rows` rows."""
        rows = x.shape[0]
        if not (0 < rows <= self.max_rows and x.dtype == torch.float32 and x.is_contiguous()
                and x.shape[1] == self.hidden):
            raise ValueError(f"native decoder takes 1..{self.max_rows} contiguous float32 rows of {self.hidden}; "
                             f"got {x.dtype} {list(x.shape)}")
        layers = self.num_layers if num_layers is None else num_layers
        caches = self._cache_pointers(kv_caches, layers)
        _, _, num_blocks, block_size, _ = kv_caches[0].shape
        out = torch.empty_like(x)
        status = self._function(ctypes.byref(self._decoder), self._layers, layers, caches, num_blocks, block_size,
                                x.data_ptr(), rows, positions.data_ptr(), slots.data_ptr(), tables.data_ptr(),
                                tables.shape[1], lengths.data_ptr(), self._scratch.data_ptr(),
                                self._qscratch.data_ptr(), out.data_ptr(), torch.get_num_threads())
        if status:
            raise ValueError(f"native decoder: {ERRORS.get(status, f'status {status}')}")
        return out

    def decode_greedy(self, embedding: torch.Tensor, head: NativeProjection, first_tokens: Sequence[int],
                      starts: Sequence[int], tables: torch.Tensor, kv_caches: Sequence[torch.Tensor], steps: int, *,
                      num_layers: int | None = None) -> list[list[int]]:
        """``steps`` greedy single-token steps in one native call: row ``r`` feeds ``first_tokens[r]`` at
        position ``starts[r]``, then each step its argmax, through the stack, the final norm and ``head``
        (the LM head's projection); returns each row's ``steps`` argmaxes. ``embedding``: the ``[vocab,
        hidden]`` float32 or bfloat16 table; ``tables``: int64 ``[rows, max_blocks]``, each covering the
        row's positions up to ``starts[r] + steps - 1``. At most :attr:`max_rows` rows."""
        rows = len(first_tokens)
        vocab = head.out_features
        if not (0 < rows <= self.max_rows and steps > 0 and embedding.dtype in self.CACHE_DTYPES
                and embedding.is_contiguous() and embedding.shape[1] == self.hidden == head.in_features
                and embedding.shape[0] >= vocab and head.weight.is_contiguous()
                and tables.dtype == torch.int64 and tables.is_contiguous() and tables.shape[0] == rows):
            raise ValueError(f"native greedy decoding: {rows} rows (1..{self.max_rows}), {steps} steps, embedding "
                             f"{embedding.dtype} {list(embedding.shape)} and head {head.in_features}->{vocab} do "
                             f"not fit a stack of width {self.hidden}, or the tables are not int64 [rows, blocks]")
        layers = self.num_layers if num_layers is None else num_layers
        caches = self._cache_pointers(kv_caches, layers)
        _, _, num_blocks, block_size, _ = kv_caches[0].shape
        bias = None if head.bias is None else head.bias.float().contiguous()  # alive until the call returns
        projection = _Projection(fn=head.function, weight=head.weight.data_ptr(),
                                 bias=None if bias is None else bias.data_ptr(), kind=head.kind, out=vocab)
        first = torch.tensor(list(first_tokens), dtype=torch.int64)
        start = torch.tensor(list(starts), dtype=torch.int64)
        out = torch.empty(rows, steps, dtype=torch.int64)
        x, hidden = torch.empty(rows, self.hidden), torch.empty(rows, self.hidden)
        logits = torch.empty(rows, vocab)
        positions, slots, lengths = (torch.empty(rows, dtype=torch.int64) for _ in range(3))
        qscratch = self._qscratch
        if head.scratch_bytes_per_row * rows > qscratch.numel():
            qscratch = torch.empty(head.scratch_bytes_per_row * self.max_rows, dtype=torch.uint8)
        status = self._greedy(ctypes.byref(self._decoder), self._layers, layers, caches, num_blocks, block_size,
                              embedding.data_ptr(), int(embedding.dtype == torch.bfloat16), ctypes.byref(projection),
                              vocab, rows, first.data_ptr(), start.data_ptr(), tables.data_ptr(), tables.shape[1],
                              steps, out.data_ptr(), x.data_ptr(), hidden.data_ptr(), logits.data_ptr(),
                              positions.data_ptr(), slots.data_ptr(), lengths.data_ptr(), self._scratch.data_ptr(),
                              qscratch.data_ptr(), torch.get_num_threads())
        if status:
            raise ValueError(f"native greedy decoding: {ERRORS.get(status, f'status {status}')}")
        return out.tolist()

    def _cache_pointers(self, kv_caches: Sequence[torch.Tensor], layers: int) -> ctypes.Array:
        """The caches' addresses as a C array, made again only when the pool was reallocated."""
        if not 0 < layers <= min(self.num_layers, len(kv_caches)):
            raise ValueError(f"native decoder: {layers} layers to run over {len(kv_caches)} caches of a "
                             f"{self.num_layers}-layer stack")
        key = tuple(cache.data_ptr() for cache in kv_caches)
        if self._caches is None or self._caches[0] != key:
            if any(cache.dtype != self.cache_dtype or not cache.is_contiguous() for cache in kv_caches):
                raise ValueError(f"native decoder: every layer's cache must be contiguous {self.cache_dtype}")
            self._caches = (key, (ctypes.c_void_p * len(key))(*key))
        return self._caches[1]


def _check_float32(tensor: torch.Tensor, what: str) -> None:
    if not (tensor.dtype == torch.float32 and tensor.is_cpu and tensor.is_contiguous()):
        raise ValueError(f"native decoder: {what} must be a contiguous float32 CPU tensor, not {tensor.dtype} "
                         f"on {tensor.device}")
