"""What the routes share: the loaded models, their engines, and the server's state."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

from enigma.errors import NotFoundError

if TYPE_CHECKING:
    from enigma.engine.async_engine import AsyncEngine
    from enigma.llm import LLM


@attrs.define
class ServedModel:
    """One model the server answers for."""

    name: str
    llm: LLM
    """The :class:`enigma.LLM` holding weights, tokenizer and engine."""
    engine: AsyncEngine | None
    """Its :class:`~enigma.engine.async_engine.AsyncEngine`, or None for embedding models."""
    created: int
    defaults: dict[str, Any] = attrs.field(factory=dict)
    """Sampling defaults: the model's generation_config.json, then its Modelfile PARAMETERs."""
    system: str | None = None
    template: str | None = None
    adapter: str | None = None
    """The LoRA adapter its requests run with (a ``--lora NAME=PATH`` of the model it shares an engine
    with, or its Modelfile's ADAPTER); None: the model's own weights."""
    embed_lock: threading.Lock = attrs.field(factory=threading.Lock)

    @property
    def is_embedding_model(self) -> bool:
        return self.engine is None

    @property
    def max_model_len(self) -> int:
        return self.llm.max_model_len


def load_served_model(name: str, **llm_options: Any) -> ServedModel:
    """Load a model by name (store, package or folder) as ``enigma run`` does (:func:`enigma.opening.open_model`)."""
    from enigma.engine.async_engine import AsyncEngine
    from enigma.opening import open_model

    opened = open_model(name, **llm_options)
    llm = opened.llm
    engine = None if llm.loaded.is_embedding_model else AsyncEngine(llm.engine)
    return ServedModel(name=name, llm=llm, engine=engine, created=int(time.time()), defaults=opened.defaults,
                       system=opened.system, template=opened.template, adapter=opened.adapter)


class ServerContext:
    """The server's models and lifecycle: ``loading`` → ``ready`` → ``stopping``."""

    def __init__(self, model_names: Sequence[str], *, llm_options: dict[str, Any] | None = None,
                 max_body_bytes: int = 4 * 2**20, auth: bool = True, rate_limit: int = 0, ip_rate_limit: int = 0,
                 token_rate_limit: int = 0, ip_token_rate_limit: int = 0,
                 keys_path: Any = None, adapters: dict[str, str] | None = None,
                 tool_parser: str | None = None, speculative: dict[str, Any] | None = None,
                 tensor_parallel_size: int = 1) -> None:
        self.model_names = list(model_names)
        self.tool_parser = tool_parser
        """How models write tool calls (``hermes``, ``llama3_json``, ``mistral``); None: as each model's chat
        template asks."""
        self.speculative = dict(speculative or {})
        """Speculative decoding for the first model (``enigma serve --draft``): SpeculativeConfig fields."""
        self.tensor_parallel_size = tensor_parallel_size
        """Processes the first model's layers are split over (``enigma serve --tensor-parallel``)."""
        self.adapters = dict(adapters or {})
        """LoRA adapters (name -> folder) served on the first model: each is a model of its own name."""
        self.llm_options = llm_options or {}
        self.max_body_bytes = max_body_bytes
        self.auth = auth
        self.rate_limit = rate_limit
        self.ip_rate_limit = ip_rate_limit
        self.token_rate_limit = token_rate_limit
        self.ip_token_rate_limit = ip_token_rate_limit
        self.public_paths: list[str] = []
        """Paths served without an API key: the transports' ``public_paths()`` (build_app fills it)."""
        self.keys_path = keys_path
        self.models: dict[str, ServedModel] = {}
        self.state = "loading"
        self.load_error: BaseException | None = None
        self.started = time.time()

    def load(self) -> None:
        """Load every model (blocking); the server answers health checks meanwhile."""
        try:
            for index, name in enumerate(self.model_names):
                options = dict(self.llm_options)
                if index == 0 and self.adapters:
                    options["adapters"] = self.adapters
                if index == 0 and self.speculative:
                    options["speculative_config"] = self.speculative
                if index == 0 and self.tensor_parallel_size > 1:
                    options["tensor_parallel_size"] = self.tensor_parallel_size
                self.models[name] = load_served_model(name, **options)
            if self.adapters:
                base = self.models[self.model_names[0]]
                for adapter in self.adapters:
                    self.models[adapter] = attrs.evolve(base, name=adapter, adapter=adapter,
                                                        embed_lock=threading.Lock())
            self.state = "ready"
        except BaseException as exc:
            self.load_error = exc
            self.state = "failed"
            raise

    async def load_in_background(self) -> None:
        try:
            await asyncio.to_thread(self.load)
        except Exception:  # /health answers 503 from now on; say why in the log
            import logging

            logging.getLogger("enigma.server").exception("loading %s failed", ", ".join(self.model_names))

    def model(self, name: Any) -> ServedModel:
        """The served model called ``name``; 404 naming the ones served otherwise."""
        from enigma.server.errors import APIError

        if not isinstance(name, str) or not name:
            raise APIError(400, "'model' is required: the name of a served model (the server lists them)",
                           param="model")
        if name in self.models:
            return self.models[name]
        aliases = {served.name.removesuffix(":latest"): served for served in self.models.values()}
        if name.removesuffix(":latest") in aliases:
            return aliases[name.removesuffix(":latest")]
        if self.state == "loading":
            raise APIError(503, f"model {name!r} is still loading; retry shortly", code="model_loading",
                           headers={"Retry-After": "2"})
        served = ", ".join(self.models) or "none"
        raise NotFoundError(f"The model {name!r} does not exist or is not served here (served: {served})")

    @property
    def alive(self) -> bool:
        """False once the server failed to start or an engine died."""
        if self.state == "failed":
            return False
        return all(m.engine is None or m.engine.is_running for m in self.models.values())

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.alive

    def stats(self) -> dict[str, Any]:
        return {name: (served.engine.stats() if served.engine is not None else {})
                for name, served in self.models.items()}

    def close(self) -> None:
        self.state = "stopping"
        for served in self.models.values():
            if served.engine is not None:
                served.engine.shutdown()
