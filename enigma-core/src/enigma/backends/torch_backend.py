"""The reference backend: plain PyTorch on CPU or CUDA.

Attention reads each sequence's keys and values from the paged KV cache:
decodes read them in place, a strided view per run of consecutive blocks
(the block manager keeps a sequence's blocks consecutive when it can);
prefill chunks read one run as a view or gather their blocks, then run
``scaled_dot_product_attention``. On CPU, float32 decode-only steps run
:mod:`enigma.native`'s kernel instead, which walks the block tables itself.
GPU kernels that walk block tables belong to plugins such as cuda-paged.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from enigma.attention import AttentionMetadata
from enigma.native import NativeKernels, kernels


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """One layer's cache: ``[2 (k, v), kv_heads, num_blocks, block_size, head_dim]``.

    Head-major, so that a sequence's keys for one head are rows of one matrix:
    the decode matmuls read them without a transposing copy.
    """
    return (2, num_kv_heads, num_blocks, block_size, head_dim)


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store this step's keys and values (``[tokens, kv_heads, dim]``) at their cache slots."""
    _, kv_heads, num_blocks, block_size, head_dim = kv_cache.shape
    flat = kv_cache.view(2, kv_heads, num_blocks * block_size, head_dim)
    flat[0].index_copy_(1, slot_mapping, key.transpose(0, 1).to(kv_cache.dtype))
    flat[1].index_copy_(1, slot_mapping, value.transpose(0, 1).to(kv_cache.dtype))


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor,
              length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``length`` cached keys and values of one sequence, ``[kv_heads, length, dim]`` each."""
    block_size = kv_cache.shape[3]
    blocks = kv_cache.index_select(2, block_table[: -(-length // block_size)])
    flat = blocks.flatten(2, 3)[:, :, :length]
    return flat[0], flat[1]


def view_kv(kv_cache: torch.Tensor, first_block: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`gather_kv` for a sequence whose blocks are consecutive: views, no copy."""
    block_size = kv_cache.shape[3]
    blocks = kv_cache[:, :, first_block:first_block + -(-length // block_size)]
    flat = blocks.flatten(2, 3)[:, :, :length]
    return flat[0], flat[1]


class CPULinear(torch.nn.Linear):
    """A float32 Linear on CPU, run by the kernel that is fastest for the rows it gets.

    Up to :attr:`NATIVE_MAX_ROWS` rows (decode steps stream the weights once for a
    few tokens), enigma's native kernel (:mod:`enigma.native`), which streams
    them at close to the memory bandwidth: on the 110M benchmark model a
    token's Linears take 25-27 ms against oneDNN's 30-34 and ``F.linear``'s
    40-50, and two to eight tokens half of oneDNN's time (see BENCHMARKS.md).
    More rows (prefill), or no native kernels here: oneDNN's blocked matmul,
    except, in a model small enough to stay in the CPU's caches, for weights
    under about 600K elements, where oneDNN's per-call cost outweighs its
    speed and ``F.linear`` stays (256x768: 39 us against 61 us; 768x2304:
    258 us against 141 us). The weight stays an ordinary ``[out, in]``
    parameter, so a head tied to the embeddings keeps sharing it, and
    whatever needs gradients runs ``F.linear``. It is an ``nn.Linear``, so
    code that looks for Linears after preparation still finds them.
    """

    NATIVE_MAX_ROWS = 32
    """Above this many rows oneDNN's blocked matmul beats the streaming kernel (measured: 48 rows)."""
    ONEDNN_MIN_ELEMENTS = 600_000
    CACHE_RESIDENT_BYTES = 32 << 20
    """Models whose Linear weights fit in this many bytes keep small Linears off oneDNN."""

    def __init__(self, linear: torch.nn.Linear, *, native: NativeKernels | None, onednn: bool) -> None:
        torch.nn.Module.__init__(self)  # an nn.Linear that shares ``linear``'s tensors, allocating none
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.native = native
        self.onednn = onednn

    @staticmethod
    def supported(linear: torch.nn.Linear) -> bool:
        return linear.weight.dtype == torch.float32 and linear.weight.device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        if self.native is not None and x.numel() <= self.NATIVE_MAX_ROWS * self.in_features:
            return self.native.linear(x, self.weight, self.bias)
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


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


def use_cpu_linears(model: torch.nn.Module, *, native: NativeKernels | None) -> None:
    """Run the exact float32 ``nn.Linear``s of ``model`` as :class:`CPULinear`, in place,
    with ``native`` kernels for few rows (None: torch's only)."""
    linears = [(module, name, child) for module in model.modules() for name, child in _linears_of(module)
               if type(child) is torch.nn.Linear and CPULinear.supported(child)]
    weight_bytes = sum(child.weight.nbytes for _, _, child in linears)
    min_onednn = 0 if weight_bytes > CPULinear.CACHE_RESIDENT_BYTES else CPULinear.ONEDNN_MIN_ELEMENTS
    has_onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    for module, name, child in linears:
        onednn = has_onednn and child.weight.numel() >= min_onednn
        replacement = CPULinear(child, native=native, onednn=onednn)
        if name in module._modules:
            setattr(module, name, replacement)
        else:  # a fused projection the model keeps outside its state dict
            module.__dict__[name] = replacement


def _linears_of(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """A module's child Linears, and Linears it holds as plain attributes (fused projections)."""
    held = [(name, value) for name, value in vars(module).items()
            if not name.startswith("_") and isinstance(value, torch.nn.Linear)]
    return [*module.named_children(), *held]


class TorchBackend:
    """Runs models with PyTorch on one device (``cuda`` when present, else ``cpu``).

    An instance keeps per-step scratch (masks, a gather buffer): it serves one
    engine, stepping in one thread.
    """

    name = "torch"

    def __init__(self, *, device: str | torch.device | None = None) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._mask_cache: tuple[AttentionMetadata, torch.Tensor] | None = None
        self._layout_cache: tuple[AttentionMetadata, list[int], bool] | None = None
        self._lengths_cache: tuple[AttentionMetadata, torch.Tensor] | None = None
        self.native = kernels() if self.device.type == "cpu" else None
        """enigma's native CPU kernels, for the Linears of models this backend prepares and for
        float32 decode-only steps' attention; None: torch's only."""
        self._scratch = torch.empty(0)

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int) -> tuple[int, ...]:
        """See :func:`kv_cache_shape`."""
        return kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)

    def prepare(self, model: torch.nn.Module, *, dtype: torch.dtype) -> torch.nn.Module:
        """Move ``model`` to this backend's device, floating-point parameters in ``dtype``, in eval mode.

        See :func:`cast_parameters`: buffers, integer and packed tensors keep
        their dtype. On CPU, float32 ``nn.Linear``s pick their kernel by the
        rows they get (see :class:`CPULinear`); other Linear modules (a
        quantizer's) are left as they are.
        """
        model = model.to(device=self.device)
        cast_parameters(model, dtype)
        fuse = getattr(model, "fuse_projections", None)
        if fuse is not None:
            fuse()
        if self.device.type == "cpu":
            use_cpu_linears(model, native=self.native)
        return model.eval()

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                  kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        """Write this step's KV into ``kv_cache``, then attend. See :class:`enigma.kinds.Backend`.

        Each sequence attends on its own. A decode (one new token) reads its
        keys and values where they lie, run of consecutive blocks by run; a
        prefill chunk reads a single run as a view and gathers otherwise.
        Decodes with short histories together run as one padded batch
        instead, where copying their few keys costs less than a loop over them.
        With the native kernels, float32 decode-only steps run theirs.
        """
        write_kv(kv_cache, key, value, metadata.slot_mapping)
        if (self.native is not None and metadata.num_tokens == metadata.num_seqs
                and query.dtype == kv_cache.dtype == torch.float32):
            return self.native.decode_attention(query, kv_cache, metadata.block_tables, self._seq_lens(metadata),
                                                window=metadata.sliding_window, scale=scale)
        starts, padded = self._layout(metadata, kv_cache)
        if padded:
            return self._decode_padded(query, kv_cache, metadata, scale)
        outputs = []
        for index, (query_len, seq_len) in enumerate(zip(metadata.query_lens, metadata.seq_lens)):
            start = starts[index]
            runs = metadata.block_runs[index] if metadata.block_runs is not None else None
            if query_len == 1 and runs is not None and len(runs) <= self.MAX_DECODE_RUNS:
                outputs.append(_decode_in_place(query[start], kv_cache, runs, seq_len, metadata.sliding_window,
                                                scale))
                continue
            if runs is not None and len(runs) == 1:
                keys, values = view_kv(kv_cache, runs[0][0], seq_len)
            else:
                num_blocks = -(-seq_len // kv_cache.shape[3])
                blocks = self._gather(kv_cache, metadata.block_tables[index, :num_blocks])
                keys, values = blocks[0].flatten(1, 2)[:, :seq_len], blocks[1].flatten(1, 2)[:, :seq_len]
            outputs.append(_attend_one(query[start:start + query_len], keys, values, metadata.sliding_window,
                                       scale))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    MAX_DECODE_RUNS = 16
    """A decode whose blocks form more runs than this is gathered instead."""

    PADDED_DECODE_BYTES_PER_SEQ = 256 << 10
    """Decode-only steps whose padded keys and values come to at most this many bytes
    per sequence and layer run as one padded batch: for short histories copying
    them costs less than a loop's per-sequence overhead (measured: enigma-tiny,
    16 sequences of 150 tokens, 147 KB each: 12 ms a step padded, 20 ms in
    place; the 110M benchmark model, 16 of 100 tokens, 590 KB each: 104 ms
    padded, 90 ms in place)."""

    def _gather(self, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """``kv_cache[:, :, block_ids]`` copied into a reused buffer.

        Gathers run every layer of every step; a fresh tensor each time costs
        more in page faults than the copy itself (measured ≈ 5×).
        """
        two, kv_heads, _, block_size, head_dim = kv_cache.shape
        shape = (two, kv_heads, len(block_ids), block_size, head_dim)
        needed = two * kv_heads * len(block_ids) * block_size * head_dim
        if self._scratch.numel() < needed or self._scratch.dtype != kv_cache.dtype \
                or self._scratch.device != kv_cache.device:
            self._scratch = torch.empty(needed, dtype=kv_cache.dtype, device=kv_cache.device)
        out = self._scratch[:needed].view(shape)
        return torch.index_select(kv_cache, 2, block_ids, out=out)

    def _seq_lens(self, metadata: AttentionMetadata) -> torch.Tensor:
        """``metadata.seq_lens`` as a tensor, made once per step (every layer asks)."""
        cached = self._lengths_cache
        if cached is None or cached[0] is not metadata:
            self._lengths_cache = cached = (metadata, torch.tensor(metadata.seq_lens, dtype=torch.int64))
        return cached[1]

    def _layout(self, metadata: AttentionMetadata, kv_cache: torch.Tensor) -> tuple[list[int], bool]:
        """Each sequence's first row in the flat batch, and whether this is a step
        for the padded decode batch (cached per step: every layer asks)."""
        cached = self._layout_cache
        if cached is None or cached[0] is not metadata:
            starts = [0, *itertools.accumulate(metadata.query_lens)][:-1]
            padded = False
            if metadata.num_seqs > 1 and metadata.num_tokens == metadata.num_seqs:
                _, kv_heads, _, block_size, head_dim = kv_cache.shape
                width = -(-max(metadata.seq_lens) // block_size) * block_size
                padded = 2 * kv_heads * width * head_dim * kv_cache.element_size() <= self.PADDED_DECODE_BYTES_PER_SEQ
            self._layout_cache = cached = (metadata, starts, padded)
        return cached[1], cached[2]

    def _decode_padded(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                       scale: float) -> torch.Tensor:
        # One query per sequence: gather the sequences' blocks into a padded
        # batch [seqs, kv_heads, max_len, dim] and mask the padding.
        _, kv_heads, _, block_size, head_dim = kv_cache.shape
        seq_lens = metadata.seq_lens
        max_len = max(seq_lens)
        num_blocks = -(-max_len // block_size)
        blocks = self._gather(kv_cache, metadata.block_tables[:, :num_blocks].reshape(-1))
        blocks = blocks.view(2, kv_heads, len(seq_lens), num_blocks * block_size, head_dim)[:, :, :, :max_len]
        keys, values = blocks[0].transpose(0, 1), blocks[1].transpose(0, 1)  # [seqs, kv_heads, len, dim]
        out = F.scaled_dot_product_attention(
            query.unsqueeze(2),               # [seqs, heads, 1, dim]
            keys, values,
            attn_mask=self._decode_mask(metadata, query.device),
            scale=scale,
            enable_gqa=query.shape[1] != kv_heads,
        )
        return out.squeeze(2)

    def _decode_mask(self, metadata: AttentionMetadata, device: torch.device) -> torch.Tensor:
        # Every layer of a step shares the metadata object: build its mask once.
        cached = self._mask_cache
        if cached is not None and cached[0] is metadata:
            return cached[1]
        seq_lens = metadata.seq_lens
        lengths = torch.tensor(seq_lens, device=device)
        positions = torch.arange(max(seq_lens), device=device)
        visible = positions[None, :] < lengths[:, None]
        if metadata.sliding_window is not None:
            visible &= positions[None, :] >= (lengths[:, None] - metadata.sliding_window)
        mask = visible[:, None, None, :]
        self._mask_cache = (metadata, mask)
        return mask


def _decode_in_place(query: torch.Tensor, kv_cache: torch.Tensor, runs: tuple[tuple[int, int], ...],
                     seq_len: int, window: int | None, scale: float) -> torch.Tensor:
    """One sequence's single query (``[heads, dim]``) over its cached keys and values,
    read where they lie: each run of consecutive blocks is a strided view.

    The query heads that share a KV head attend as that head's queries (no
    mask is needed: a decode sees every cached key). One run is one SDPA call
    (its CPU kernel beats two matmuls here by 1.2-2x); several runs share one
    softmax over their matmul scores. Returns ``[1, heads, dim]``.
    """
    _, kv_heads, num_blocks, block_size, head_dim = kv_cache.shape
    heads = query.shape[0]
    head_stride, kv_stride = num_blocks * block_size * head_dim, kv_heads * num_blocks * block_size * head_dim
    base = kv_cache.storage_offset()
    first_visible = 0 if window is None else max(0, seq_len - window)
    pieces = []                                                             # (storage offset, tokens)
    position = 0
    for first, count in runs:
        lo, hi = max(position, first_visible), min(position + count * block_size, seq_len)
        if lo < hi:
            pieces.append((base + (first * block_size + lo - position) * head_dim, hi - lo))
        position += count * block_size
        if position >= seq_len:
            break
    if len(pieces) == 1:
        offset, n = pieces[0]
        keys = kv_cache.as_strided((1, kv_heads, n, head_dim), (0, head_stride, head_dim, 1), offset)
        values = kv_cache.as_strided((1, kv_heads, n, head_dim), (0, head_stride, head_dim, 1), offset + kv_stride)
        out = F.scaled_dot_product_attention(query.view(1, kv_heads, heads // kv_heads, head_dim), keys, values,
                                             scale=scale)
        return out.reshape(1, heads, head_dim)  # CUDA's kernels may hand back a non-contiguous layout
    grouped = (query * scale).view(kv_heads, heads // kv_heads, head_dim)
    scores = [torch.matmul(grouped, kv_cache.as_strided((kv_heads, head_dim, n), (head_stride, 1, head_dim),
                                                           offset))
              for offset, n in pieces]                                      # [kv_heads, group, n] each
    probs = (scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1)).softmax(dim=-1)
    out = None
    seen = 0
    for offset, n in pieces:
        values = kv_cache.as_strided((kv_heads, n, head_dim), (head_stride, head_dim, 1), offset + kv_stride)
        part = probs[..., seen:seen + n]
        out = torch.matmul(part, values) if out is None else torch.baddbmm(out, part, values)
        seen += n
    return out.view(1, heads, head_dim)


def _attend_one(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, window: int | None,
                scale: float) -> torch.Tensor:
    """Causal attention of one sequence's last ``len(query)`` positions over ``keys``/``values``."""
    query_len, seq_len = query.shape[0], keys.shape[1]
    if query_len == 1 and window is None:
        return _decode_one(query, keys, values, scale)
    mask = None
    is_causal = False
    if window is not None and seq_len > 1:
        mask = _causal_mask(query_len, seq_len, window, query.device)
    elif query_len == seq_len:
        is_causal = query_len > 1
    elif query_len > 1:
        mask = _causal_mask(query_len, seq_len, None, query.device)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1),     # [heads, q_len, dim]
        keys, values,              # [kv_heads, len, dim]
        attn_mask=mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=query.shape[1] != keys.shape[0],
    )
    return out.transpose(0, 1)     # [q_len, heads, dim]


def _decode_one(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
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


def _causal_mask(query_len: int, seq_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """``[query_len, seq_len]`` bool mask: the queries are the last ``query_len`` positions."""
    query_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    key_pos = torch.arange(seq_len, device=device)[None, :]
    mask = key_pos <= query_pos
    if window is not None:
        mask &= key_pos > query_pos - window
    return mask
