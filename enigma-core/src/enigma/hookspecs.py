"""The contract between enigma and its plugins: every hook, in one place.

A plugin is a module named by an entry point in the ``enigma`` group whose
functions are decorated with :data:`hookimpl` and named like a spec below.
Hooks are called with keyword arguments only; an implementation may accept
any subset of a spec's arguments. Specs only ever gain arguments.

The ``enigma_register_*`` hooks follow the "register callback" pattern: the
kernel owns the registry and hands each plugin a ``register`` function bound
to that plugin, so a duplicate name is an error that names both
distributions. Their signature::

    register(name, factory, *, priority=0, available=None, summary="", options=None)

``name``
    short, user-visible, unique within the kind ("torch", "cuda-paged").
``factory``
    the implementation's class or a callable returning an instance; or a
    ``"module:attribute"`` string, imported only when the implementation is
    first used, so that loading plugins stays cheap.
``priority``
    ``select(kind, "auto")`` picks the highest priority among available ones.
``available``
    a zero-argument callable returning :class:`enigma.kinds.Availability`
    (or a bool); None means always available.
``summary``
    one line for ``enigma plugins``.
``options``
    an attrs class of the options one use of it takes (a trainer's
    ``--lora-rank``), checked like settings; None for none.
``devices``
    backends: the torch device types it runs on (``("cuda",)``); empty for
    any. ``auto`` with a device named (``--device cpu``) chooses among those
    registered for its type or for any.

Keep plugin modules light: import only ``enigma`` at module level.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # for type checkers only: importing these here would slow every start
    from pathlib import Path

    import click
    import torch

    from enigma.engine.engine import Engine
    from enigma.events import RequestFinished, RequestStarted
    from enigma.kinds import LoadContext, Register
    from enigma.outputs import RequestOutput
    from enigma.server.context import ServerContext
    from enigma.server.generation import GenerationAnswer, GenerationRequest

PROJECT_NAME = "enigma"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

# ---------------------------------------------------------------- Backends


@hookspec
def enigma_register_backends(register: Register) -> None:
    """Register backends: where and how model math runs.

    Called once per plugin while plugins load. Each implementation must satisfy
    :class:`enigma.kinds.Backend`; the factory is called with keyword
    arguments ``device`` (str or None for the backend's choice).
    Today: ``torch`` (enigma-core, the reference).
    """


# ---------------------------------------------------------------- Scheduling


@hookspec
def enigma_register_schedulers(register: Register) -> None:
    """Register schedulers: which requests run in each engine step.

    Called once per plugin while plugins load. Each implementation must satisfy
    :class:`enigma.kinds.Scheduler`.
    """


# ---------------------------------------------------------------- Cache


@hookspec
def enigma_register_caches(register: Register) -> None:
    """Register KV caches: how key/value memory is laid out and shared.

    Called once per plugin while plugins load. Each implementation must satisfy
    :class:`enigma.kinds.Cache`.
    """


# ---------------------------------------------------------------- Quantization


@hookspec
def enigma_register_quantizers(register: Register) -> None:
    """Register quantizers: weight formats below 16 bits.

    Called once per plugin while plugins load. Each implementation must satisfy
    :class:`enigma.kinds.Quantizer`.
    """


# ---------------------------------------------------------------- Training


@hookspec
def enigma_register_trainers(register: Register) -> None:
    """Register trainers: SFT, LoRA, DPO, sharded training.

    Called once per plugin while plugins load. Each implementation must satisfy
    :class:`enigma.kinds.Trainer`.
    """


# ---------------------------------------------------------------- Retrieval


@hookspec
def enigma_register_retrievers(register: Register) -> None:
    """Register retrievers: document indexes that ground answers.

    Called once per plugin while plugins load. Each implementation must satisfy
    :class:`enigma.kinds.Retriever`.
    """


# ---------------------------------------------------------------- Transport


@hookspec
def enigma_register_transports(register: Register) -> None:
    """Register transports: routes the server exposes (HTTP, WebSocket, metrics).

    Called once per plugin while plugins load. Unlike the kinds above, every
    available transport is used (the extension pattern), not one selected.
    Each implementation must satisfy :class:`enigma.kinds.Transport`.
    """


@hookspec
def enigma_asgi_wrapper(app: Any, context: ServerContext) -> Any:
    """Wrap the server's whole ASGI app (datasette's ``asgi_wrapper``).

    Called once per plugin when the app is built, with the app as wrapped so
    far and the :class:`enigma.server.ServerContext`. Return a new ASGI
    callable (``async def wrapped(scope, receive, send)``) that calls ``app``,
    or None to leave it. Later plugins wrap earlier ones; core's own
    middleware (request ids, body limit, API keys, rate limits) is innermost,
    so wrappers see every request, authorised or not, and ``scope["state"]``
    holds ``api_key`` once core's middleware ran.
    """


@hookspec
def enigma_before_generation(request: GenerationRequest) -> GenerationRequest | GenerationAnswer | None:
    """Look at a chat or completion request before it is templated and run.

    Called for each request a transport receives, plugin after plugin, with
    ``request``, an :class:`enigma.server.GenerationRequest` as the plugins
    before left it. Return None to leave it, a changed copy
    (``attrs.evolve(request, messages=...)``: retrieval adds context) that the
    next plugin sees, or an :class:`enigma.server.GenerationAnswer` to answer
    without generating (a response cache); that ends the chain. Raise an
    :class:`enigma.errors.EnigmaError` to refuse the request with its message.
    """


@hookspec
def enigma_request_fields() -> dict[str, str] | None:
    """Name the request body fields your ``enigma_before_generation`` reads.

    Called when a transport checks a chat or completion body. Return
    ``{"rag": "an object: {collection, top_k}"}`` — field names and what they
    hold — or None. Transports refuse a field nobody names (400
    ``unknown_parameter``); these they accept and leave in
    ``GenerationRequest.body`` for the hook, which checks their values (raise
    :class:`enigma.errors.BadRequestError`). Clients send them as the openai
    SDK's ``extra_body``.
    """


@hookspec
def enigma_generation_finished(request: GenerationRequest, output: RequestOutput,
                               chunks: list[list[tuple[str, list[int]]]]) -> None:
    """A request that went through ``enigma_before_generation`` finished.

    ``request`` is the :class:`enigma.server.GenerationRequest` that ran (as
    the hooks left it); ``output`` the finished :class:`enigma.RequestOutput`
    (its ``outputs[i].text`` whole, ``finish_reason`` set); ``chunks`` each
    completion's deltas as the engine streamed them, ``(text, token_ids)``,
    in ``output.outputs`` order (what a cache needs to replay a stream). Not
    called for answers a hook gave, nor for aborted requests. Observers only:
    a raising one is logged and skipped.
    """


@hookspec
def enigma_health() -> dict[str, Any] | None:
    """Report on a plugin's own dependencies for ``GET /health/full``.

    Called on every ``/health/full`` request; keep it cheap (no network round
    trip: report what the plugin last saw). Return a JSON object with at least
    ``"status"`` (``"ok"``, ``"degraded"`` — serving, with a part missing — or
    ``"down"``) and whatever explains it (``{"status": "degraded", "redis":
    "unreachable since ..."}``), or None. It appears under ``checks``, keyed
    by plugin name; it does not change ``/health`` or ``/health/ready``.
    """


# ---------------------------------------------------------------- Models


@hookspec
def enigma_register_models(register: Register) -> None:
    """Register models that ship inside a package, by name (``enigma-tiny``).

    Called once per plugin while plugins load. The factory takes no arguments
    and returns the path of a Hugging Face model folder (config.json,
    safetensors, tokenizer files) inside the package. ``LLM(name)`` and the
    CLI find such models by name, offline, like models in the store.
    Today: ``enigma-tiny`` (enigma-plugin-tiny).
    """


# ---------------------------------------------------------------- Model loading


@hookspec
def enigma_register_architectures(register: Register) -> None:
    """Register model families by the Hugging Face architecture name they implement.

    Called once per plugin while plugins load. ``register("LlamaForCausalLM",
    "my_pkg.model:MyLlama")``: the factory is the model *class*; the loader
    calls ``cls.from_hf_config(hf_config)`` on the meta device, then
    ``post_materialize()`` once weights have memory. Causal LMs also offer
    ``forward(input_ids, positions, context)``, ``compute_logits(hidden)``,
    ``num_layers``, ``kv_shape`` and ``checkpoint_tensors()`` (see
    :mod:`enigma.models`). Module names must be the checkpoint's tensor names.
    Today: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``
    (builtin ``llama``) and ``BertModel`` (builtin ``bert``).
    """


@hookspec
def enigma_register_weight_sources(register: Register) -> None:
    """Register weight sources: file formats the loader reads tensors from.

    Called once per plugin while plugins load. Each implementation must satisfy
    :class:`enigma.kinds.WeightSource`; the loader opens a folder with the
    highest-priority source whose ``matches(folder)`` is true.
    Today: ``safetensors`` (enigma-core).
    """


@hookspec
def enigma_register_executors(register: Register) -> None:
    """Register executors: where a model's forward passes run for the engine.

    Called once per plugin while plugins load. Each implementation must satisfy
    :class:`enigma.kinds.Executor`. Today: ``local`` (enigma-core: this process),
    ``tensor-parallel`` (enigma-plugin-zero: a driver and worker processes, each
    holding a shard of every layer).
    """


@hookspec(firstresult=True)
def enigma_import_model_file(path: Path, folder: Path) -> bool | None:
    """Make a model folder from a single-file model (``x.gguf``): ``enigma pull x.gguf``, ``FROM x.gguf``,
    ``LLM("x.gguf")``.

    ``path`` is the file (absolute), ``folder`` an empty folder to fill with what
    the loader reads: config.json (with ``quantization_config`` naming the
    quantizer whose ``transform`` runs it), the tokenizer files, and the model
    file itself, which may be a symbolic link to ``path`` (callers that keep
    the folder copy it). Return True when handled, None for a file the plugin
    does not read (the next plugin is asked). Raise an
    :class:`enigma.errors.EnigmaError` naming the file for one it reads but
    refuses (truncated, unsupported architecture).
    Today: ``.gguf`` (enigma-plugin-ggml).
    """


@hookspec
def enigma_transform_model(model: torch.nn.Module, context: LoadContext) -> None:
    """Change a model's module tree after it is built and before it has weights.

    Called on every plugin for every model the loader builds, with ``model``
    on the meta device (swap or wrap modules freely; new ones are created on
    meta too) and ``context``, an :class:`enigma.kinds.LoadContext`. A plugin
    that has nothing to do for this model returns at once. The weights that
    follow load by the names of the transformed model's parameters and
    persistent buffers. An exception stops the load with an error naming the
    plugin. (A quantized folder's own quantizer is applied by the kernel
    before these hooks, through :meth:`enigma.kinds.Quantizer.transform`.)
    """


# ---------------------------------------------------------------- Settings


@hookspec
def enigma_plugin_settings() -> type | None:
    """Declare the plugin's settings: return an attrs class whose fields have defaults.

    Called once per plugin while plugins load. Its keys are read from the
    config file's ``[plugins.<plugin name>]`` table and from
    ``ENIGMA_PLUGINS__<NAME>__<KEY>`` variables, checked against the field
    types (and ``attrs`` validators; :func:`enigma.config.setting` adds an
    ``allowed`` text), listed by ``enigma config show`` and set by
    ``enigma config set plugins.<name>.<key> VALUE``. The plugin reads them
    with :func:`enigma.config.plugin_settings`. Return None for no settings.
    """


# ---------------------------------------------------------------- CLI


@hookspec
def enigma_commands(cli: click.Group) -> None:
    """Add subcommands to the ``enigma`` command.

    Called once per plugin when the command starts, with ``cli``, the root
    ``click.Group``: decorate functions with ``@cli.command()`` or call
    ``cli.add_command``. A plugin whose hook raises is reported by
    ``enigma plugins``; the other commands still work. Import heavy modules
    inside the command's body, not here.
    """


# ---------------------------------------------------------------- Lifecycle


@hookspec
def enigma_engine_started(engine: Engine) -> None:
    """An engine finished loading its model and is ready to take requests.

    ``engine`` offers ``model_name`` and ``stats()``. Observers only: return
    nothing, raise nothing (a raising observer is logged and skipped).
    """


@hookspec
def enigma_engine_stopped(engine: Engine) -> None:
    """An engine stopped; no further requests will run on it."""


@hookspec
def enigma_request_started(event: RequestStarted) -> None:
    """A request was accepted; ``event`` is an :class:`enigma.events.RequestStarted`."""


@hookspec
def enigma_request_finished(event: RequestFinished) -> None:
    """A request left the engine; ``event`` is an :class:`enigma.events.RequestFinished`.

    It carries token counts and timings, from which observers derive
    time-to-first-token, inter-token and end-to-end latencies.
    """


REGISTER_HOOKS: dict[str, str] = {
    "backend": "enigma_register_backends",
    "scheduler": "enigma_register_schedulers",
    "cache": "enigma_register_caches",
    "quantizer": "enigma_register_quantizers",
    "trainer": "enigma_register_trainers",
    "retriever": "enigma_register_retrievers",
    "transport": "enigma_register_transports",
    "model": "enigma_register_models",
    "architecture": "enigma_register_architectures",
    "weight_source": "enigma_register_weight_sources",
    "executor": "enigma_register_executors",
}
"""The registration hook of each kind."""
