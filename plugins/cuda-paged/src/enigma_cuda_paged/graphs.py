"""Decode steps replayed from CUDA graphs: one launch for a whole step's kernels.

A decode step of a small model is hundreds of kernel launches whose Python
and launch overhead dwarfs the math; replaying a captured graph removes both.
Graphs need fixed shapes and fixed addresses, so decode-only steps are padded
to a *batch size bucket* (1, 2, 4, 8, then multiples of 8) and each bucket
gets its own static inputs — token ids, positions, KV slots, block tables,
sequence lengths — laid out in one int64 tensor, so that a step's inputs go
up in one host-to-device copy before the replay. Padding rows decode a dummy
token into a spare KV block that the block manager never hands out
(:meth:`CudaPagedBackend.kv_cache_shape` adds it), so they touch no
sequence's cache.

Graphs are captured the first time a bucket is used (the first of them in a
shared memory pool), and dropped when the KV pool is reallocated (their
kernels hold its addresses). Steps with prefills, drafts to verify, adapters
or logits for every token run eagerly. On a CPU the same padded path runs
without capture — that is how its tests check the padding and the static
tables where no GPU is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import torch

from enigma.attention import AttentionMetadata, ForwardContext, forward_context
from enigma_cuda_paged.kernels import StepTables, kv_splits, multiprocessors, tile_tokens


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The padded batch sizes graphs are captured for: 1, 2, 4, then multiples of 8, up to the first that holds
    ``max_batch``."""
    buckets: list[int] = []
    for size in (1, 2, 4, *range(8, max_batch + 8, 8)):
        buckets.append(size)
        if size >= max_batch:
            break
    return tuple(buckets)


@attrs.define
class StaticStep:
    """One bucket's inputs at fixed addresses, its step tables, and (on CUDA) its captured graph."""

    batch: int
    packed: torch.Tensor
    """int64 ``[batch * (4 + max_blocks)]``: ids, positions, slots, sequence lengths, block tables."""
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    tables: StepTables
    logits: torch.Tensor | None = None
    graph: Any = None


class DecodeGraphs:
    """Runs a :class:`~enigma.runner.ModelRunner`'s decode-only steps from static buffers, replaying CUDA
    graphs where ``capture`` (on CUDA) and eagerly otherwise."""

    def __init__(self, runner: Any, backend: Any, *, max_batch: int, capture: bool) -> None:
        self.runner = runner
        self.backend = backend
        self.capture = capture
        self.buckets = batch_buckets(max_batch)
        self.max_blocks = -(-runner.max_model_len // runner.block_size)
        self.steps: dict[int, StaticStep] = {}
        self.pool: Any = None
        self.replays = 0
        """Steps run from this object (replayed, or run over the static buffers where nothing is captured)."""

    def reset(self) -> None:
        """Forget every bucket: the KV pool moved, and the graphs hold its old addresses."""
        self.steps.clear()
        self.pool = None

    def takes(self, chunks: Sequence[Any]) -> bool:
        """Whether this step is a plain decode of at most the largest bucket's size, whose block tables fit the
        static ones (a speculative lookahead can reach a block past the model's length)."""
        model = self.runner.model
        return (0 < len(chunks) <= self.buckets[-1] and getattr(model, "fused_layers", None) is None
                and hasattr(model.config, "num_heads")
                and all(len(chunk.token_ids) == 1 and not chunk.all_logits and chunk.adapter is None
                        and len(chunk.block_table) <= self.max_blocks for chunk in chunks))

    def execute(self, chunks: Sequence[Any], *, input_ids: torch.Tensor | None = None) -> Any:
        """The step's :class:`~enigma.runner.StepLogits`, or None when it is not one this object runs.
        ``input_ids`` (on the device) stand for the chunks' token ids."""
        from enigma.runner import StepLogits

        if not self.takes(chunks):
            return None
        batch = next(size for size in self.buckets if size >= len(chunks))
        step = self.steps.get(batch) or self._prepare(batch)
        self._fill(step, chunks)
        if input_ids is not None:
            step.input_ids[: len(chunks)].copy_(input_ids)  # after the upload, on the same stream
        if step.graph is not None:
            step.graph.replay()
        else:
            step.logits = self._forward(step)
        self.replays += 1
        return StepLogits(step.logits[: len(chunks)], {})

    def _prepare(self, batch: int) -> StaticStep:
        device = self.runner.device
        width = self.max_blocks
        packed = torch.zeros(batch * (4 + width), dtype=torch.int64, device=device)
        input_ids, positions, slots, seq_lens = packed[: 4 * batch].view(4, batch)
        block_tables = packed[4 * batch:].view(batch, width)
        ordinal = torch.arange(batch + 1, dtype=torch.int64, device=device)
        kv_heads = self.runner.model.kv_shape[0]
        group = self.runner.model.config.num_heads // kv_heads
        # split for the longest history the bucket may see: a graph's shape is fixed, the split's share is not
        splits = kv_splits(batch * kv_heads, self.runner.max_model_len, multiprocessors(device))
        tables = StepTables(q_starts=ordinal, seq_lens=seq_lens, tile_seq=ordinal[:batch],
                            tile_first=torch.zeros(batch, dtype=torch.int64, device=device),
                            block_q=tile_tokens(group, 1), splits=splits)
        metadata = AttentionMetadata(query_lens=(1,) * batch, seq_lens=(1,) * batch, slot_mapping=slots,
                                     block_tables=block_tables, block_size=self.runner.block_size)
        step = StaticStep(batch=batch, packed=packed, input_ids=input_ids, positions=positions, metadata=metadata,
                          tables=tables)
        self._fill(step, [])
        if self.capture:
            self._capture(step)
        self.steps[batch] = step
        return step

    def _fill(self, step: StaticStep, chunks: Sequence[Any]) -> None:
        """Write this step's inputs into the bucket's buffers in one copy; padding rows decode token 0 at
        position 0 into the spare block."""
        batch, width, block_size = step.batch, self.max_blocks, self.runner.block_size
        spare = self.runner.kv_caches[0].shape[2] - 1
        packed = np.zeros(batch * (4 + width), dtype=np.int64)
        columns = packed[: 4 * batch].reshape(4, batch)
        tables = packed[4 * batch:].reshape(batch, width)
        count = len(chunks)
        positions = [chunk.start for chunk in chunks]
        columns[0, :count] = [chunk.token_ids[0] for chunk in chunks]
        columns[1, :count] = positions
        columns[2, :count] = [chunk.block_table[position // block_size] * block_size + position % block_size
                              for chunk, position in zip(chunks, positions)]
        columns[3, :count] = positions
        columns[3, :count] += 1
        for row, chunk in enumerate(chunks):
            tables[row, : len(chunk.block_table)] = chunk.block_table
        columns[2, count:] = spare * block_size
        columns[3, count:] = 1
        tables[count:, 0] = spare
        host = torch.from_numpy(packed)
        if step.packed.is_cuda:
            host = host.pin_memory()
        step.packed.copy_(host, non_blocking=True)

    def _forward(self, step: StaticStep) -> torch.Tensor:
        runner = self.runner
        self.backend.use_step_tables(step.metadata, step.tables)
        context = ForwardContext(backend=self.backend, metadata=step.metadata, kv_caches=runner.kv_caches)
        with forward_context(context):
            hidden = runner.model(step.input_ids, step.positions, context)
        return runner.model.compute_logits(hidden)

    def _capture(self, step: StaticStep) -> None:
        # Warm up on a side stream (Triton compiles its kernels, the allocator settles), then capture.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(step)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step.logits = self._forward(step)
        if self.pool is None:
            self.pool = graph.pool()
        step.graph = graph
