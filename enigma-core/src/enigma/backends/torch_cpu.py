"""The builtin ``torch-cpu`` backend: the torch backend with enigma's CPU fast paths.

- Linears: :class:`CPULinear` picks per call between enigma's native
  streaming matmul (:mod:`enigma.native`, few rows), oneDNN and ``F.linear``.
- Decode attention: float32 decode-only steps run the native kernel, which
  walks the block tables itself; otherwise each sequence's keys and values are
  read where they lie — a strided view per run of consecutive blocks (the
  ``paged`` cache keeps a sequence's blocks consecutive when it can) — and
  short decode batches run padded together, where copying a few keys costs
  less than a loop.
- Prefill chunks whose blocks form one run attend over a view, the rest gather.

Chosen by ``auto`` on machines without a CUDA device.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from enigma.attention import AttentionMetadata
from enigma.backends.torch_backend import TorchBackend, attend_one, write_kv
from enigma.native import NativeKernels, kernels
from enigma.native.decoder import NativeProjection


def block_runs(block_table: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """``block_table`` as runs of consecutive block ids: ``[4, 5, 6, 9, 2, 3]`` ->
    ``((4, 3), (9, 1), (2, 2))``."""
    runs: list[tuple[int, int]] = []
    first = previous = None
    for block in block_table:
        if previous is not None and block == previous + 1:
            previous = block
            continue
        if first is not None:
            runs.append((first, previous - first + 1))
        first = previous = block
    if first is not None:
        runs.append((first, previous - first + 1))
    return tuple(runs)


def view_kv(kv_cache: torch.Tensor, first_block: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``length`` keys and values of a sequence whose blocks are consecutive from
    ``first_block``: views, no copy."""
    block_size = kv_cache.shape[3]
    blocks = kv_cache[:, :, first_block:first_block + -(-length // block_size)]
    flat = blocks.flatten(2, 3)[:, :, :length]
    return flat[0], flat[1]


class CPULinear(torch.nn.Linear):
    """A float32 Linear on CPU, run by the kernel that is fastest for the rows it gets (a bfloat16 one: the
    native kernel with its weights widened as they are read for few rows, else torch's ``F.linear``).

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
        return linear.weight.dtype in (torch.float32, torch.bfloat16) and linear.weight.device.type == "cpu"

    def native_projection(self) -> NativeProjection | None:
        """This Linear in the native decoder (:mod:`enigma.backends.fused_layers`): the native float32 or
        bfloat16 matmul up to :attr:`NATIVE_MAX_ROWS` rows; None without the native kernels."""
        if self.native is None or not self.weight.is_contiguous():
            return None
        function = self.native.bf16_matmul if self.weight.dtype == torch.bfloat16 else self.native.f32_matmul
        return NativeProjection(function=function, weight=self.weight.detach(),
                                in_features=self.in_features, out_features=self.out_features,
                                bias=None if self.bias is None else self.bias.detach().float(),
                                max_rows=self.NATIVE_MAX_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        few_rows = self.native is not None and x.numel() <= self.NATIVE_MAX_ROWS * self.in_features
        if self.weight.dtype == torch.bfloat16:
            if few_rows:
                return self.native.linear(x.float(), self.weight, _float(self.bias)).to(x.dtype)
            if not cpu_has_bf16_matmul():  # torch's bf16 matmul emulated: 4-6x slower than widening first
                return F.linear(x.float(), self.weight.float(), _float(self.bias)).to(x.dtype)
            return F.linear(x, self.weight, self.bias)
        if few_rows:
            return self.native.linear(x, self.weight, self.bias)
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), as torch detects it, so that torch's
    bfloat16 matmul is fast; elsewhere it is emulated (128 rows of a 4096x768 weight: 40 ms, against 10 ms
    widened to float32)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _float(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.float()


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


class TorchCPUBackend(TorchBackend):
    """The torch backend on the CPU, with enigma's native kernels and in-place decode attention.

    An instance keeps per-step scratch (masks, a gather buffer, the step's
    block runs): it serves one engine, stepping in one thread.
    """

    name = "torch-cpu"

    def __init__(self, *, device: str | torch.device | None = None) -> None:
        device = torch.device(device or "cpu")
        if device.type != "cpu":
            from enigma.errors import BadRequestError

            raise BadRequestError(f"backend 'torch-cpu' runs on the CPU, not on {device}; choose backend "
                                  "'torch' (or a GPU backend) for that device")
        super().__init__(device=device)
        self._mask_cache: tuple[AttentionMetadata, torch.Tensor] | None = None
        self._layout_cache: tuple[AttentionMetadata, list[int], bool] | None = None
        self._lengths_cache: tuple[AttentionMetadata, torch.Tensor] | None = None
        self._rows_cache: tuple[AttentionMetadata, torch.Tensor, torch.Tensor] | None = None
        self._runs_cache: tuple[AttentionMetadata, list[tuple[tuple[int, int], ...]]] | None = None
        self.native: NativeKernels | None = kernels()
        """enigma's native CPU kernels, for the Linears of models this backend prepares and for
        float32 decode-only steps' attention; None: torch's only."""
        self._scratch = torch.empty(0)

    def prepare(self, model: torch.nn.Module, *, dtype: torch.dtype) -> torch.nn.Module:
        """The torch backend's preparation, then float32 ``nn.Linear``s (fused ones included) pick
        their kernel by the rows they get (see :class:`CPULinear`); other Linear modules (a
        quantizer's) are left as they are."""
        model = super().prepare(model, dtype=dtype)
        use_cpu_linears(model, native=self.native)
        if self.native is not None:
            from enigma.backends.fused_layers import fuse_llama_layers

            fuse_llama_layers(model, self.native, self)
        return model

    def attention_rows(self, metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables and lengths with one row per query token, as the native decode attention reads
        them: a decode-only step's own; otherwise each query as a decode of its own (see
        :meth:`_query_rows`)."""
        if metadata.num_tokens == metadata.num_seqs:
            return metadata.block_tables, self._seq_lens(metadata)
        return self._query_rows(metadata)

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
        if (self.native is not None and query.dtype == kv_cache.dtype == torch.float32
                and max(metadata.query_lens) <= self.SHORT_QUERY_MAX):
            tables, lengths = self.attention_rows(metadata)
            return self.native.decode_attention(query, kv_cache, tables, lengths, window=metadata.sliding_window,
                                                scale=scale)
        starts, padded = self._layout(metadata, kv_cache)
        if padded:
            return self._decode_padded(query, kv_cache, metadata, scale)
        outputs = []
        for index, (query_len, seq_len) in enumerate(zip(metadata.query_lens, metadata.seq_lens)):
            start = starts[index]
            runs = self._runs(metadata)[index]
            if query_len == 1 and len(runs) <= self.MAX_DECODE_RUNS:
                outputs.append(_decode_in_place(query[start], kv_cache, runs, seq_len, metadata.sliding_window,
                                                scale))
                continue
            if len(runs) == 1:
                keys, values = view_kv(kv_cache, runs[0][0], seq_len)
            else:
                num_blocks = -(-seq_len // kv_cache.shape[3])
                blocks = self._gather(kv_cache, metadata.block_tables[index, :num_blocks])
                keys, values = blocks[0].flatten(1, 2)[:, :seq_len], blocks[1].flatten(1, 2)[:, :seq_len]
            if 1 < query_len <= self.SHORT_QUERY_MAX and query_len < seq_len:
                outputs.append(_attend_short(query[start:start + query_len], keys, values, metadata.sliding_window,
                                             scale))
                continue
            outputs.append(attend_one(query[start:start + query_len], keys, values, metadata.sliding_window,
                                      scale))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    SHORT_QUERY_MAX = 16
    """Chunks of up to this many new tokens after a history (verifying speculative drafts) attend by
    matmuls with an additive causal mask: SDPA with a mask takes its slow generic path on CPU
    (enigma-tiny, 5 queries over 133 keys: 137 us a layer against 35)."""

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

    def _runs(self, metadata: AttentionMetadata) -> list[tuple[tuple[int, int], ...]]:
        """Each sequence's blocks as runs of consecutive ids (made once per step: every layer asks)."""
        cached = self._runs_cache
        if cached is None or cached[0] is not metadata:
            tables = metadata.block_tables.tolist()
            runs = [block_runs(table[:-(-length // metadata.block_size)])
                    for table, length in zip(tables, metadata.seq_lens)]
            self._runs_cache = cached = (metadata, runs)
        return cached[1]

    def _query_rows(self, metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Every query as a decode of its own: its sequence's block table, and as length its position
        + 1 (causal). Short chunks (drafts being verified) then run the native decode kernel; made once
        per step."""
        cached = self._rows_cache
        if cached is None or cached[0] is not metadata:
            counts = torch.tensor(metadata.query_lens, dtype=torch.int64)
            tables = metadata.block_tables.repeat_interleave(counts, dim=0)
            lengths = [length - count + offset + 1 for length, count in zip(metadata.seq_lens, metadata.query_lens)
                       for offset in range(count)]
            self._rows_cache = cached = (metadata, tables, torch.tensor(lengths, dtype=torch.int64))
        return cached[1], cached[2]

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


def _attend_short(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, window: int | None,
                  scale: float) -> torch.Tensor:
    """A few queries (``[q, heads, dim]``, the last ``q`` positions) over ``keys``/``values``
    (``[kv_heads, len, dim]``), causal: the heads of a KV head attend together, one matmul each way."""
    query_len, heads, head_dim = query.shape
    kv_heads, seq_len = keys.shape[0], keys.shape[1]
    group = heads // kv_heads
    grouped = query.view(query_len, kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(
        kv_heads, group * query_len, head_dim)
    scores = torch.matmul(grouped, keys.transpose(1, 2)).mul_(scale).view(kv_heads, group, query_len, seq_len)
    scores.add_(_short_causal_bias(query_len, seq_len, window, query.device, scores.dtype))
    probs = scores.softmax(dim=-1).view(kv_heads, group * query_len, seq_len)
    out = torch.matmul(probs, values).view(kv_heads, group, query_len, head_dim)
    return out.permute(2, 0, 1, 3).reshape(query_len, heads, head_dim)


def _short_causal_bias(query_len: int, seq_len: int, window: int | None, device: torch.device,
                       dtype: torch.dtype) -> torch.Tensor:
    """``[q, len]``: 0 where query ``i`` (position ``len - q + i``) sees the key, -inf elsewhere."""
    query_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    key_pos = torch.arange(seq_len, device=device)[None, :]
    hidden = key_pos > query_pos
    if window is not None:
        hidden |= key_pos <= query_pos - window
    return torch.zeros((query_len, seq_len), dtype=dtype, device=device).masked_fill_(hidden, float("-inf"))


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


