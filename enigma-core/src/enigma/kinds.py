"""The kinds of implementation and the contract each must honour.

Seven extension kinds (backend ... transport) plus three that feed the
model-loading pipeline: ``model`` (model folders that packages ship),
``architecture`` (model families: the module tree a config.json describes)
and ``weight_source`` (file formats weights are read from).

A plugin registers implementations by kind through the ``enigma_register_*``
hooks (see :mod:`enigma.hookspecs`). What the kernel later calls on an
instance is written here as a small typed :class:`~typing.Protocol` per kind;
specs only ever gain optional arguments, so an implementation written today
keeps working.

Types from torch, the engine and the server are imported for type checkers only
(annotations stay strings), so this module imports none of them: ``enigma --help``
must stay fast and work without them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:  # these import torch or Starlette; this module must not
    import torch

    from enigma.attention import AttentionMetadata
    from enigma.engine.request import Request
    from enigma.quantize import QuantizationSource
    from enigma.server.context import ServerContext
    from enigma.training.config import TrainConfig
    from enigma.training.progress import TrainProgress

KINDS: tuple[str, ...] = (
    "backend",
    "scheduler",
    "cache",
    "quantizer",
    "trainer",
    "retriever",
    "transport",
    "model",
    "architecture",
    "weight_source",
    "executor",
)
"""Every kind an implementation can be registered as, in documentation order."""


@attrs.frozen
class Availability:
    """Whether an implementation can run on this machine, and if not, why.

    Truthy when available. ``reason`` says what is missing and, where it can,
    what to do ("no CUDA device found; use backend 'torch'").
    """

    ok: bool
    reason: str = ""
    auto: bool = True
    """Whether ``auto`` may choose it; False: it runs here, but only when named (``reason`` says why)."""

    def __bool__(self) -> bool:
        return self.ok

    @classmethod
    def yes(cls, *, auto: bool = True, reason: str = "") -> Availability:
        return cls(True, reason, auto)

    @classmethod
    def no(cls, reason: str) -> Availability:
        return cls(False, reason)


AvailabilityCheck = Callable[[], "Availability | bool"]
"""A zero-argument callable a plugin registers with an implementation."""


class Register(Protocol):
    """The ``register`` callback an ``enigma_register_*`` hook receives, bound to its plugin and kind."""

    def __call__(self, name: str, factory: Callable[..., Any] | str, *, priority: int = 0,
                 available: AvailabilityCheck | None = None, summary: str = "",
                 options: type | None = None, devices: Sequence[str] = ()) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """Runs a model's math on one device.

    ``prepare`` places a freshly loaded model on the backend's device in the
    requested dtype (and may compile it); ``attention`` is the only attention
    the models call, so kernels and KV-cache layouts are the backend's choice.

    Optionally, ``step_runner(runner)`` returns an object that runs some of a
    :class:`~enigma.runner.ModelRunner`'s steps itself: its ``execute(chunks)``
    returns the step's :class:`~enigma.runner.StepLogits`, or None to leave the
    step to the runner's eager forward, and its ``reset()`` is called when the
    KV pool is reallocated (cuda-paged replays decode steps from CUDA graphs).
    Optionally, ``kv_cache_dtype(dtype)`` names the dtype the KV cache is
    stored in for a model running in ``dtype`` (cuda-paged: fp8 on request);
    without it the cache has the model's dtype. Optionally, a true
    ``overlaps_steps`` says the device runs apart from the host, so that the
    engine queues decode steps ahead (async scheduling; cuda-paged on a GPU).
    A step runner's ``execute`` also takes ``input_ids``: the step's token ids
    already on the device (fed from the previous step's draw), standing for
    the chunks' own.
    """

    device: torch.device

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """The shape of one layer's paged KV cache tensor; its layout is the backend's choice."""

    def prepare(self, model: torch.nn.Module, *, dtype: torch.dtype) -> torch.nn.Module:
        """Return ``model`` (a ``torch.nn.Module``) ready to run on this backend.

        Cast floating-point *parameters* to ``dtype`` and nothing else: buffers,
        integer (packed) tensors and modules with ``keeps_dtype = True`` (a
        quantizer's) stay as loaded (``enigma.backends.torch_backend.cast_parameters``)."""

    def kv_cache_memory(self, requested: int | float | None) -> int:
        """Bytes for the KV pool on this backend's device: ``requested`` bytes (int), a fraction of
        the device's free memory (float in (0, 1]), or the backend's default (None). Called after
        ``prepare``, so free memory excludes the weights."""

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, kv_cache: torch.Tensor,
                  metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        """Store this step's keys and values in the cache, then attend.

        ``query`` is ``[num_tokens, num_heads, head_dim]`` for the new tokens of
        the step (all sequences packed), ``key``/``value`` ``[num_tokens,
        num_kv_heads, head_dim]``; ``kv_cache`` is one layer's paged cache,
        shaped by ``kv_cache_shape``; ``metadata`` an
        :class:`enigma.attention.AttentionMetadata`. Causal within each
        sequence. Returns ``[num_tokens, num_heads, head_dim]``.
        """


@attrs.frozen(kw_only=True)
class ScheduledRequest:
    """One request's work in a step: compute ``num_tokens`` tokens from position ``start``."""

    request: Request
    num_tokens: int
    """Tokens to compute: a prompt chunk, 1 for a decode, 1 + ``len(draft_token_ids)`` when verifying drafts."""
    start: int
    """The request's ``num_computed_tokens`` when scheduled: the first position computed."""
    block_table: Sequence[int]
    """Its KV blocks, covering positions ``0 .. start + num_tokens - 1``."""
    draft_token_ids: Sequence[int] = ()
    """Speculative tokens after the request's own, verified this step (their KV written, then kept or rolled
    back by ``update_from_output``). Empty without speculative decoding."""


@attrs.frozen(kw_only=True)
class SchedulerOutput:
    """What ``Scheduler.schedule`` decided for one step."""

    scheduled: Sequence[ScheduledRequest]
    preempted: Sequence[Request] = ()
    """Requests that lost their blocks this step (they are recomputed later)."""

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.scheduled)


@attrs.frozen(kw_only=True)
class ModelRunnerOutput:
    """What one step produced, for ``Scheduler.update_from_output``."""

    sampled_token_ids: Mapping[str, Sequence[int]]
    """Request id -> tokens appended to it this step (already on ``request.sequence``): none while a
    prompt is still being prefilled, one per decode, up to ``1 + drafts`` when drafts were verified."""
    num_rejected_drafts: Mapping[str, int] = attrs.field(factory=dict)
    """Request id -> how many of its draft tokens were rejected: their KV positions are rolled back."""


@runtime_checkable
class Scheduler(Protocol):
    """Decides which requests run in each engine step (admission, chunking, preemption) and owns
    their KV traffic: it alone calls the :class:`Cache`.

    The factory is called with ``cache`` (the engine's :class:`Cache`),
    ``max_num_seqs`` and ``max_num_batched_tokens``. Requests are
    :class:`enigma.engine.request.Request`: ``num_tokens`` (prompt + output so
    far) and ``num_computed_tokens`` (those whose KV is in the cache), which
    only the scheduler changes. A request is finished when
    ``request.finished`` (its sequence hit a stop, or was aborted).

    Each engine step calls :meth:`schedule`, runs the model over what it
    returns, samples, then calls :meth:`update_from_output`. The engine
    checks the contract and fails with an error naming the scheduler when it
    is broken (a chunk past the request's tokens, blocks not covering it,
    computed tokens not advanced, no progress while requests wait).

    Optionally, ``follow_on(output)`` gives the next decode of a step whose
    every request is drawing a token — each one token further, at the
    position of the token being drawn, its slot allocated — or None to choose
    afresh with :meth:`schedule`. With it the engine may queue that step
    before the draw reaches the host (async scheduling: the device computes
    while the host takes the last tokens in); its :meth:`update_from_output`
    then comes after the drawn step's. Without it every step is
    :meth:`schedule`'s.
    """

    def add_request(self, request: Request) -> None:
        """Queue a new request; called once per request by the engine."""

    def schedule(self) -> SchedulerOutput:
        """This step's work; every scheduled request has blocks for ``start + num_tokens`` tokens."""

    def update_from_output(self, output: SchedulerOutput, runner_output: ModelRunnerOutput) -> None:
        """After the step: advance each scheduled request's ``num_computed_tokens`` by its
        ``num_tokens`` less rejected drafts, commit its full blocks to the cache (prefix caching),
        and release finished requests' blocks."""

    def abort(self, requests: Iterable[Request]) -> None:
        """Drop requests at once (their sequences are already aborted), releasing everything they hold."""

    def has_unfinished(self) -> bool:
        """True while any request is waiting or running."""

    def stats(self) -> Mapping[str, float]:
        """Counters (running, waiting, preempted) for health and metrics."""


@runtime_checkable
class Cache(Protocol):
    """Owns KV blocks: who holds which, and which prefixes are cached.

    The factory is called with ``num_blocks``, ``block_size``,
    ``max_model_len`` and ``enable_prefix_caching``. Only the scheduler calls it.
    """

    def lookup_prefix(self, request_id: str, token_ids: Sequence[int], *, salt: str | None = None) -> int:
        """Give a new request the cached blocks of its longest cached prefix; return its length in tokens.

        ``salt`` (given only when set: a request's LoRA adapter) separates requests whose keys and
        values differ for the same tokens; blocks are shared only under the same salt, and the
        request's blocks are committed under it."""

    def allocate(self, request_id: str, num_tokens: int) -> bool:
        """Make the request's blocks cover ``num_tokens`` tokens in all; False when there is no room
        (nothing changes then: the scheduler preempts or waits)."""

    def commit(self, request_id: str, token_ids: Sequence[int]) -> None:
        """The request's first ``len(token_ids)`` tokens are computed: register its full blocks."""

    def cancel(self, request_id: str) -> None:
        """Undo a lookup and allocation whose admission failed."""

    def free(self, request_id: str) -> None:
        """Return every block the request holds to the pool."""

    def block_table(self, request_id: str) -> Sequence[int]:
        """The physical block ids holding the request's tokens, in order."""

    def stats(self) -> Mapping[str, float]:
        """Counters for health and metrics (``kv_blocks_used``, free, cached, hit rate)."""


@attrs.frozen(kw_only=True)
class LoadContext:
    """What the loading pipeline knows about the model it is building; given to transforms."""

    folder: Path
    """The model folder being loaded."""
    hf_config: Mapping[str, Any]
    """Its config.json."""
    architecture: str
    """The architecture chosen from ``hf_config["architectures"]``."""
    dtype: torch.dtype
    """The dtype floating-point weights are built in."""
    device: torch.device
    """The device the weights will live on."""
    options: Mapping[str, Any] = attrs.field(factory=dict)
    """Load options the caller passed (``LLM(..., load_options={...})``), for plugins that take some."""

    @property
    def quantization(self) -> Mapping[str, Any] | None:
        """config.json's ``quantization_config``, when the folder holds a quantized model."""
        value = self.hf_config.get("quantization_config")
        return value if isinstance(value, Mapping) else None


@runtime_checkable
class Quantizer(Protocol):
    """Turns a model into a quantized artifact, and loads such artifacts (gpt-fast's two steps).

    An artifact is a model folder whose config.json carries
    ``"quantization_config": {"quant_method": <the quantizer's registered name>,
    "type": <one of its types>, ...}`` (the key Hugging Face uses), beside the
    quantized tensors in any format a weight source reads. The loader sees
    ``quant_method``, selects the quantizer of that name and calls
    :meth:`transform` on the unmaterialised model; the weights then load by name.
    The factory takes no arguments.
    """

    def types(self) -> Mapping[str, str]:
        """The quantization types it makes, each with a one-line description (``{"Q4_K_M": "..."}``)."""

    def quantize(self, model: QuantizationSource, *, type: str, output: Path, options: Mapping[str, Any],
                 progress: Callable[[int, int], None] | None = None) -> None:
        """Write ``model`` quantized as ``type`` into the empty folder ``output``.

        ``model`` is an :class:`enigma.quantize.QuantizationSource`: its ``hf_config``,
        its tensors one at a time (``with model.weights() as weights``), its module tree
        on the meta device (``model.module_tree()``), or, for quantizers that calibrate,
        the whole model (``model.load()``). Write config.json (``model.hf_config`` plus ``quantization_config``) and the
        tensors; the kernel copies the tokenizer files and makes the folder appear
        atomically. ``progress(done, total)`` reports work done (e.g. tensors).
        """

    def transform(self, model: torch.nn.Module, *, context: LoadContext) -> None:
        """Swap the unmaterialised ``model``'s modules (on the meta device) for ones
        whose parameters and buffers are named like the artifact's tensors."""


@runtime_checkable
class Executor(Protocol):
    """Runs a causal LM's forward passes for the engine: in this process (``local``), or split over worker
    processes (``tensor-parallel``, enigma-plugin-zero). The engine, scheduler and KV pool above it are the
    same either way."""

    def create_runner(self, loaded: Any, backend: Any, *, block_size: int, options: Any) -> Any:
        """A :class:`enigma.runner.ModelRunner` (or one that behaves as it does: ``execute``, ``resize``,
        ``bytes_per_block``, ``close``) for ``loaded`` on ``backend``; ``options`` an
        :class:`enigma.runner.ExecutorOptions`."""


@runtime_checkable
class Trainer(Protocol):
    """Trains or fine-tunes a model from a training configuration."""

    def train(self, config: TrainConfig, *, progress: Callable[[TrainProgress], None] | None = None) -> Path | str:
        """Run training to completion (or resume it); return the output folder."""


@attrs.frozen(kw_only=True)
class Document:
    """A text to index, with metadata a search can filter on and answers cite."""

    text: str
    metadata: Mapping[str, Any] = attrs.field(factory=dict)
    """Anything JSON can hold: ``{"source": "manual.pdf", "page": 3}``."""
    id: str | None = None
    """The caller's id; the retriever makes one when None. Adding an id again replaces it."""


@attrs.frozen(kw_only=True)
class SearchHit:
    """One passage a search found."""

    id: str
    text: str
    score: float
    """Higher is more relevant (cosine similarity for vector indexes)."""
    metadata: Mapping[str, Any] = attrs.field(factory=dict)


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors; what a retriever is given to embed with."""

    dimensions: int

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector of ``dimensions`` floats per text (normalised when the model normalises)."""


@runtime_checkable
class Retriever(Protocol):
    """Indexes documents and finds the passages relevant to a query: one named collection.

    The factory is called with ``collection`` (its name), ``storage`` (a
    folder of its own, under the data dir, that it may fill; it exists) and
    ``embedder`` (an :class:`Embedder`, or None when the caller gave no
    embedding model: keyword retrievers need none, vector retrievers say
    they need one).
    """

    def add(self, documents: Iterable[Document]) -> list[str]:
        """Index documents (chunking them as it sees fit); return their ids, in order."""

    def search(self, query: str, *, k: int = 4, where: Mapping[str, Any] | None = None) -> list[SearchHit]:
        """The ``k`` best passages for ``query``, best first; ``where`` keeps only those whose
        metadata has each given key equal to the given value."""

    def delete(self, ids: Iterable[str]) -> int:
        """Remove documents (and their passages) by id; return how many existed."""

    def count(self) -> int:
        """How many documents the collection holds."""


@runtime_checkable
class Transport(Protocol):
    """Contributes routes to the server's ASGI app."""

    def routes(self, context: ServerContext) -> Sequence[Any]:
        """Starlette routes (``Route``/``WebSocketRoute``/``Mount``) to serve."""


@runtime_checkable
class Weights(Protocol):
    """Tensors by checkpoint name, opened by a :class:`WeightSource`; a context manager."""

    def keys(self) -> Iterable[str]:
        """Every tensor name."""

    def __contains__(self, name: object) -> bool:
        """Whether a tensor of that name exists."""

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, without reading it."""

    def get(self, name: str) -> torch.Tensor:
        """The tensor (a ``torch.Tensor`` on the CPU, in its stored dtype)."""

    def __enter__(self) -> Weights: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class WeightSource(Protocol):
    """Reads weights from one file format (safetensors builtin; GGUF, EXL2 from plugins).

    The factory takes no arguments. The loader asks every weight source, highest
    priority first, whether it ``matches`` a folder and opens the first that does.
    """

    description: str
    """What it reads, for errors ("*.safetensors files")."""

    def matches(self, folder: Path) -> bool:
        """Whether ``folder`` holds weights in this format."""

    def open(self, folder: Path) -> Weights:
        """Open the folder's weights (memory-mapped where possible)."""


PROTOCOLS: dict[str, type] = {
    "backend": Backend,
    "scheduler": Scheduler,
    "cache": Cache,
    "quantizer": Quantizer,
    "trainer": Trainer,
    "retriever": Retriever,
    "transport": Transport,
    "weight_source": WeightSource,
}
"""The protocol an instance of each extension kind must satisfy (a ``model`` factory returns a
folder path; an ``architecture`` is a model class, see :mod:`enigma.models`)."""
