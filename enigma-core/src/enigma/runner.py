"""Running a causal LM over one step's flat batch of sequence chunks.

The runner owns the model (prepared by a backend) and the KV cache tensors
(one paged tensor per layer). Whoever schedules — the engine, or a simple
loop — says which blocks each sequence owns; the runner turns the step's
chunks into :class:`~enigma.attention.AttentionMetadata`, runs one forward
pass and returns logits.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import torch

from enigma.attention import AttentionMetadata, ForwardContext, forward_context
from enigma.loader import LoadedModel
from enigma.transfer import to_device


@attrs.frozen
class SequenceChunk:
    """The tokens of one sequence to compute in this step."""

    token_ids: Sequence[int]
    start: int
    """Position of the first of them: how many of the sequence's tokens are already cached."""
    block_table: Sequence[int]
    """The sequence's KV blocks, covering positions ``0 .. start + len(token_ids) - 1``."""
    all_logits: bool = False
    """Return logits for every token (prompt logprobs), not only the last."""
    adapter: str | None = None
    """The adapter (LoRA) these tokens run with; None: the base model."""


@attrs.frozen
class StepLogits:
    last: torch.Tensor
    """``[num_chunks, vocab]`` float32 logits of each chunk's last token."""
    full: dict[int, torch.Tensor]
    """Chunk index -> ``[len(token_ids), vocab]`` logits, for chunks that asked."""


class ModelRunner:
    """A causal LM, its backend and its paged KV cache."""

    def __init__(self, loaded: LoadedModel | None, backend: object, *, block_size: int = 16,
                 num_blocks: int = 0, prepared: torch.nn.Module | None = None,
                 dtype: torch.dtype | None = None) -> None:
        """Prepare ``loaded`` on ``backend``; or, given a ``prepared`` model and its ``dtype``, run that
        one as it is (a view of another runner's model: a speculative self-draft)."""
        self.backend = backend
        if prepared is None:
            self.model = backend.prepare(loaded.model, dtype=loaded.dtype)
            self.dtype = loaded.dtype
        else:
            self.model, self.dtype = prepared, dtype
        self.device = backend.device
        self.block_size = block_size
        self.vocab_size = self.model.config.vocab_size
        self.max_model_len = self.model.config.max_position_embeddings
        kv_cache_dtype = getattr(backend, "kv_cache_dtype", None)
        self.kv_dtype = kv_cache_dtype(self.dtype) if kv_cache_dtype is not None else self.dtype
        """What the KV cache holds: the model's dtype unless the backend stores it otherwise (fp8)."""
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.step_runner: Any = None
        self.resize(num_blocks)
        make_step_runner = getattr(backend, "step_runner", None)
        self.step_runner = make_step_runner(self) if make_step_runner is not None else None
        """What the backend runs some steps with instead of an eager forward (cuda-paged: CUDA graphs for
        decodes); its ``execute(chunks)`` returns :class:`StepLogits`, or None to leave the step to the runner."""

    @property
    def overlaps_steps(self) -> bool:
        """Whether the backend's device works apart from the host (``backend.overlaps_steps``: cuda-paged on a
        GPU), so that the engine gains by queueing a step before taking the last one's tokens in."""
        return bool(getattr(self.backend, "overlaps_steps", False))

    @property
    def bytes_per_block(self) -> int:
        kv_heads, head_dim = self.model.kv_shape
        element = torch.empty((), dtype=self.kv_dtype).element_size()
        return 2 * self.block_size * kv_heads * head_dim * element * self.model.num_layers

    def resize(self, num_blocks: int) -> None:
        """Make the pool ``num_blocks`` blocks; what it held is discarded.

        Each layer's tensor has the shape the backend asks for
        (``backend.kv_cache_shape``): the layout is the backend's choice.
        """
        kv_heads, head_dim = self.model.kv_shape
        shape = self.backend.kv_cache_shape(num_blocks, self.block_size, kv_heads, head_dim)
        self.kv_caches = []  # free the old pool before allocating the new one
        if self.step_runner is not None:
            self.step_runner.reset()
        self.kv_caches = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
                          for _ in range(self.model.num_layers)]
        self.num_blocks = num_blocks

    def close(self) -> None:
        """Release what the runner holds beyond its tensors (an executor's worker processes)."""

    def metadata(self, chunks: Sequence[SequenceChunk]) -> AttentionMetadata:
        """The step's :class:`~enigma.attention.AttentionMetadata` (see :meth:`step_inputs`)."""
        return self.step_inputs(chunks)[2]

    def step_inputs(self, chunks: Sequence[SequenceChunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The step's token ids, their positions and its attention metadata: built with numpy (no loop over
        tokens) in one int64 buffer that reaches the device in one copy (from pinned memory on CUDA)."""
        count = len(chunks)
        lengths = np.fromiter((len(chunk.token_ids) for chunk in chunks), dtype=np.int64, count=count)
        starts = np.fromiter((chunk.start for chunk in chunks), dtype=np.int64, count=count)
        total = int(lengths.sum())
        width = max(len(chunk.block_table) for chunk in chunks)
        packed = np.zeros(3 * total + count * width, dtype=np.int64)
        ids, positions, slots = packed[:total], packed[total:2 * total], packed[2 * total:3 * total]
        tables = packed[3 * total:].reshape(count, width)
        ids[:] = np.fromiter(itertools.chain.from_iterable(chunk.token_ids for chunk in chunks), dtype=np.int64,
                             count=total)
        for row, chunk in enumerate(chunks):
            tables[row, :len(chunk.block_table)] = chunk.block_table
        # each token's position: its index in the step, less where its chunk begins, plus the chunk's start
        positions[:] = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths - starts, lengths)
        block_size = self.block_size
        slots[:] = (tables[np.repeat(np.arange(count), lengths), positions // block_size] * block_size
                    + positions % block_size)
        uploaded = to_device(packed, self.device)
        metadata = AttentionMetadata(
            query_lens=tuple(lengths.tolist()),
            seq_lens=tuple((starts + lengths).tolist()),
            slot_mapping=uploaded[2 * total:3 * total],
            block_tables=uploaded[3 * total:].view(count, width),
            block_size=block_size,
        )
        return uploaded[:total], uploaded[total:2 * total], metadata

    @torch.inference_mode()
    def execute(self, chunks: Sequence[SequenceChunk], *, input_ids: torch.Tensor | None = None) -> StepLogits:
        """One forward pass over every chunk; logits for each chunk's last token. ``input_ids``: the step's
        token ids already on the device (a decode fed from the previous step's draw before the host has it),
        standing for the chunks' own."""
        if self.step_runner is not None:
            logits = self.step_runner.execute(chunks, input_ids=input_ids)
            if logits is not None:
                return logits
        own_ids, positions, metadata = self.step_inputs(chunks)
        input_ids = own_ids if input_ids is None else input_ids
        adapters = tuple(chunk.adapter for chunk in chunks)
        context = ForwardContext(backend=self.backend, metadata=metadata, kv_caches=self.kv_caches,
                                 adapters=adapters if any(adapters) else ())
        with forward_context(context):
            hidden = self.model(input_ids, positions, context)
        return self._logits(chunks, hidden)

    @torch.inference_mode()
    def decode_greedy(self, feeds: Sequence[Sequence[int]], starts: Sequence[int],
                      block_tables: Sequence[Sequence[int]], steps: Sequence[int]) -> list[list[int]]:
        """Greedy continuations, as a draft model drafts for greedy requests: sequence ``i``'s tokens
        ``feeds[i]`` are fed from position ``starts[i]`` (the KV before it cached), then its argmax is fed
        back, one token a forward, until it has ``steps[i]`` argmaxes; the sequences batched, KV written
        through ``block_tables[i]``. Returns each sequence's argmaxes. The model's own fast loop where it
        has one (``model.decode_greedy``: the native decoder's steps back to back), else one
        :meth:`execute` a step."""
        feeds, starts, steps = [list(feed) for feed in feeds], list(starts), list(steps)
        tables = [list(table) for table in block_tables]
        fast = getattr(self.model, "decode_greedy", None)
        if fast is not None and self.step_runner is None:
            chosen = fast(self.kv_caches, self.block_size, feeds, starts, tables, steps)
            if chosen is not None:
                return chosen
        chosen = [[] for _ in feeds]
        active = [i for i in range(len(feeds)) if steps[i] > 0]
        while active:
            logits = self.execute([SequenceChunk(feeds[i], starts[i], tables[i]) for i in active]).last
            for i, token in zip(active, logits.argmax(dim=-1).tolist()):
                chosen[i].append(token)
                starts[i] += len(feeds[i])
                feeds[i] = [token]
            active = [i for i in active if len(chosen[i]) < steps[i]]
        return chosen

    def _logits(self, chunks: Sequence[SequenceChunk], hidden: torch.Tensor) -> StepLogits:
        """The step's logits from its hidden states: each chunk's last token's, and every token's for chunks
        that ask (the head runs once per token either way)."""
        rows: list[int] = []  # rows of hidden the head runs over
        spans: list[tuple[int, int]] = []  # each chunk's rows among them
        start = 0
        for chunk in chunks:
            end = start + len(chunk.token_ids)
            first = start if chunk.all_logits else end - 1
            spans.append((len(rows), len(rows) + end - first))
            rows.extend(range(first, end))
            start = end
        if len(rows) < hidden.shape[0]:  # else the rows are every one, in order
            hidden = hidden[to_device(rows, self.device)]
        logits = self.model.compute_logits(hidden)
        if not any(chunk.all_logits for chunk in chunks):  # the head ran over each chunk's last token only
            return StepLogits(logits, {})
        full = {index: logits[low:high] for index, (chunk, (low, high)) in enumerate(zip(chunks, spans))
                if chunk.all_logits}
        return StepLogits(logits[[high - 1 for _, high in spans]], full)


@attrs.frozen(kw_only=True)
class ExecutorOptions:
    """What an executor needs beyond the loaded model: how to load it again elsewhere (workers)."""

    tensor_parallel_size: int = 1
    backend: str = "auto"
    """The backend's name as asked for (a worker creates its own)."""
    device: str | None = None
    load_options: Mapping[str, Any] | None = None


class LocalExecutor:
    """The ``local`` executor: one :class:`ModelRunner` in this process."""

    def create_runner(self, loaded: LoadedModel, backend: object, *, block_size: int,
                      options: ExecutorOptions) -> ModelRunner:
        if options.tensor_parallel_size != 1:
            from enigma.errors import ConfigError

            raise ConfigError(f"the local executor runs one process; tensor_parallel_size="
                              f"{options.tensor_parallel_size} needs the tensor-parallel executor "
                              "(pip install enigma-plugin-zero)")
        return ModelRunner(loaded, backend, block_size=block_size)
