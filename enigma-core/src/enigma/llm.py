"""``LLM``: the offline Python API, shaped like vLLM's.

>>> from enigma import LLM, SamplingParams
>>> llm = LLM("path/to/hf-folder")
>>> outs = llm.generate(["Once upon a time"], SamplingParams(max_tokens=32, temperature=0))
>>> outs[0].outputs[0].text

All prompts go to the engine at once: continuous batching over a paged KV
cache, with prefix caching.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from collections.abc import Sequence as SequenceOf
from pathlib import Path
from typing import Any

import torch

from enigma.errors import BadRequestError, ConfigError, NotAvailableError, NotFoundError
from enigma.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from enigma.sampling import SamplingParams

Prompt = str | list[int]
Message = dict[str, Any]


def kv_blocks_for(runner: Any, kv_cache_memory: int | float | None, max_num_seqs: int, *,
                  extra_bytes_per_block: int = 0) -> int:
    """How many KV blocks a memory budget buys, never more than ``max_num_seqs``
    full-length sequences need. The budget is bytes (an int), a fraction of the
    backend's device memory (a float in (0, 1]), or the backend's default
    (``Backend.kv_cache_memory``: on CPU a tenth of the machine's memory, at most 4 GiB).
    ``extra_bytes_per_block``: what each block costs besides the runner's own (a draft model's KV)."""
    budget = runner.backend.kv_cache_memory(kv_cache_memory)
    per_block = runner.bytes_per_block + extra_bytes_per_block
    blocks = int(budget) // per_block
    if blocks < 1:
        raise BadRequestError(f"kv_cache_memory={kv_cache_memory} gives {budget} bytes, less than one KV block "
                              f"({per_block} bytes); give more")
    per_sequence = math.ceil(runner.max_model_len / runner.block_size)
    return int(min(blocks, per_sequence * max_num_seqs))


def _draft_bytes_per_block(speculator: Any) -> int:
    runner = getattr(getattr(speculator, "proposer", None), "runner", None)
    return runner.bytes_per_block if runner is not None else 0


def resolve_model_path(model: str | Path) -> Path:
    """The folder of ``model``: a path to a Hugging Face model folder or a model file
    (``x.gguf``, through the plugin that reads it), a model in the store
    (``name[:tag]``), or a model an installed package ships (``enigma-tiny``)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        from enigma.model_files import model_file_folder

        return model_file_folder(path)
    from enigma.plugins import get_host
    from enigma.store import ModelName, Store

    try:
        name = ModelName.parse(str(model))
    except BadRequestError:
        name = None
    store = Store()
    if name is not None and store.exists(name):
        return store.path(name)
    packaged = {impl.name: impl for impl in get_host().registry.implementations("model")}
    if name is not None and name.tag == "latest" and name.name in packaged:
        return Path(packaged[name.name].create())
    known = ", ".join(sorted(packaged)) or "none installed"
    raise NotFoundError(f"model {str(model)!r} not found: it is not a folder, not in the store (see `enigma list`; "
                        f"`enigma pull` fetches models) and no installed package ships it (packaged: {known})")


class LLM:
    """A model loaded for offline generation or embedding."""

    def __init__(self, model: str | Path, *, dtype: str | torch.dtype = "auto", backend: str = "auto",
                 device: str | None = None, block_size: int = 16, kv_cache_memory: int | float | None = None,
                 num_kv_blocks: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 enable_prefix_caching: bool = True, cache: str = "auto", scheduler: str = "auto",
                 served_model_name: str | None = None, load_options: dict[str, Any] | None = None,
                 adapters: dict[str, str | Path] | None = None, max_loras: int = 4,
                 default_adapter: str | None = None, enable_lora: bool = False,
                 speculative_model: str | Path | None = None, num_speculative_tokens: int | None = None,
                 speculative_config: Any = None, tensor_parallel_size: int = 1,
                 async_scheduling: bool | None = None) -> None:
        from enigma.loader import load_model
        from enigma.plugins import get_host
        from enigma.tokenizer import Tokenizer

        folder = resolve_model_path(model)
        self.backend = get_host().create("backend", backend, device=device)
        if adapters or enable_lora:
            load_options = {**(load_options or {}), "lora_adapters": {n: str(p) for n, p in (adapters or {}).items()},
                            "max_loras": max_loras, "lora_all_linear": enable_lora}
        self.loaded = load_model(folder, dtype=dtype, device=self.backend.device, options=load_options)
        if (adapters or enable_lora) and getattr(self.loaded.model, "adapters", None) is None:
            raise NotAvailableError("serving LoRA adapters needs enigma-plugin-lora: pip install enigma-plugin-lora")
        self.tokenizer = Tokenizer(folder)
        self.model_name = served_model_name or str(model)  # the name events and errors use
        self._ids = itertools.count()
        self._runner = None
        self._pooling = None
        if self.loaded.is_embedding_model:
            from enigma.embedding import read_max_seq_length, read_pooling

            self.model = self.backend.prepare(self.loaded.model, dtype=self.loaded.dtype)
            self._pooling = read_pooling(folder)
            self.max_model_len = read_max_seq_length(folder, self.loaded.hf_config)
        else:
            from enigma.engine.engine import Engine
            from enigma.runner import ExecutorOptions

            if tensor_parallel_size > 1 and (speculative_model is not None or speculative_config is not None):
                raise ConfigError("speculative decoding does not run under tensor parallelism yet; "
                                  "use one of them")
            executor = self._executor(tensor_parallel_size)
            self._runner = executor.create_runner(self.loaded, self.backend, block_size=block_size,
                                                  options=ExecutorOptions(tensor_parallel_size=tensor_parallel_size,
                                                                          backend=backend, device=device,
                                                                          load_options=load_options))
            speculator = self._speculator(speculative_model, num_speculative_tokens, speculative_config, dtype)
            blocks = num_kv_blocks or kv_blocks_for(self._runner, kv_cache_memory, max_num_seqs,
                                                    extra_bytes_per_block=_draft_bytes_per_block(speculator))
            self.engine = Engine(self._runner, self.tokenizer, model_name=self.model_name, num_blocks=blocks,
                                 cache=cache, scheduler=scheduler, max_num_seqs=max_num_seqs,
                                 max_num_batched_tokens=max_num_batched_tokens,
                                 enable_prefix_caching=enable_prefix_caching, speculator=speculator,
                                 async_scheduling=async_scheduling)
            self.max_model_len = self.engine.max_model_len
            if default_adapter is not None:
                self.engine.default_adapter = default_adapter
        self.eos_token_ids = self.tokenizer.eos_token_ids

    @staticmethod
    def _executor(tensor_parallel_size: int) -> Any:
        from enigma.plugins import get_host

        if tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size={tensor_parallel_size}: give 1 or more processes")
        if tensor_parallel_size == 1:
            return get_host().create("executor", "local")
        try:
            return get_host().create("executor", "tensor-parallel")
        except NotFoundError:
            raise ConfigError(f"tensor_parallel_size={tensor_parallel_size} needs the tensor-parallel executor: "
                              "pip install enigma-plugin-zero") from None

    def close(self) -> None:
        """Stop what the model holds beyond this process's memory (a tensor-parallel run's workers)."""
        if self._runner is not None:
            self._runner.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _speculator(self, speculative_model: Any, num_speculative_tokens: int | None, speculative_config: Any,
                    dtype: Any) -> Any:
        """The engine's speculative decoding (None when not asked for)."""
        from enigma.speculative.config import SpeculativeConfig

        config = SpeculativeConfig.build(None if speculative_model is None else str(speculative_model),
                                         num_speculative_tokens, speculative_config)
        if config is None:
            return None
        from enigma.speculative.speculator import build_speculator

        return build_speculator(config, target_runner=self._runner, backend=self.backend, dtype=dtype)

    def add_adapter(self, name: str, folder: str | Path) -> None:
        """Serve one more LoRA adapter (PEFT's format) as ``name``, from the next request on; needs
        ``LLM(..., enable_lora=True)`` (every Linear ready for adapters) unless it adapts only modules
        the adapters given at load adapt."""
        registry = getattr(self.loaded.model, "adapters", None)
        if registry is None:
            raise NotAvailableError("this model was loaded without adapters; load it with enable_lora=True "
                                    "(needs enigma-plugin-lora)")
        registry.add(name, folder)

    GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    """generation_config.json keys that :meth:`sampling_defaults` reads."""

    def sampling_defaults(self) -> dict[str, Any]:
        """The sampling settings the model's authors recommend (its generation_config.json),
        as ``SamplingParams`` keyword arguments; vLLM applies the same ones by default."""
        import json

        path = self.loaded.folder / "generation_config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        except ValueError:
            return {}
        if config.get("do_sample") is False:
            return {"temperature": 0.0}
        return {key: config[key] for key in self.GENERATION_DEFAULTS if config.get(key) is not None}

    # ------------------------------------------------------------ generation

    def generate(self, prompts: Prompt | SequenceOf[Prompt],
                 sampling_params: SamplingParams | SequenceOf[SamplingParams] | None = None, *,
                 adapter: str | SequenceOf[str | None] | None = None) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); one :class:`RequestOutput` per prompt, in order.
        ``adapter`` names the LoRA adapter (one of ``LLM(..., adapters=)``) for all prompts, or one per
        prompt (None: the base model); prompts of different adapters run in one batch."""
        self._require_generator("generate")
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params_list = self._params_for(len(prompts), sampling_params)
        adapter_list = self._adapters_for(len(prompts), adapter)
        requests = []
        for prompt, params, name in zip(prompts, params_list, adapter_list):
            if isinstance(prompt, str):
                requests.append((prompt, self.tokenizer.encode(prompt), params, name))
            else:
                requests.append((None, list(prompt), params, name))
        return self._run(requests)

    def chat(self, messages: list[Message] | SequenceOf[list[Message]],
             sampling_params: SamplingParams | SequenceOf[SamplingParams] | None = None, *,
             add_generation_prompt: bool = True, chat_template: str | None = None,
             **template_kwargs: Any) -> list[RequestOutput]:
        """Answer one conversation (a list of messages) or several, through the chat template."""
        self._require_generator("chat")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        params_list = self._params_for(len(conversations), sampling_params)
        requests = []
        for conversation, params in zip(conversations, params_list):
            text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                      chat_template=chat_template, **template_kwargs)
            requests.append((text, self.tokenizer.encode(text, add_special_tokens=False), params, None))
        return self._run(requests)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None, *,
               prompt_text: str | None = None, adapter: str | None = None) -> Iterator[RequestOutput]:
        """Generate for one prompt, yielding each step's new text and tokens as they come
        (``outputs[i].text`` holds only the delta). Closing the iterator early, or an
        exception such as Ctrl-C while it runs, aborts the request and frees its KV blocks."""
        self._require_generator("stream")
        params = sampling_params or SamplingParams()
        if isinstance(prompt, str):
            prompt_text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
        engine = self.engine
        request_id = engine.add_request(None, token_ids, params, prompt_text=prompt_text, adapter=adapter)
        finished = False
        try:
            while not finished:
                for output in engine.step(delta=True):
                    if output.request_id == request_id:
                        finished = output.finished
                        yield output
        finally:
            if not finished:
                engine.abort(request_id)

    def _params_for(self, count: int, params: SamplingParams | SequenceOf[SamplingParams] | None) -> list:
        if params is None:
            return [SamplingParams()] * count
        if isinstance(params, SamplingParams):
            return [params] * count
        params = list(params)
        if len(params) != count:
            raise BadRequestError(f"got {len(params)} SamplingParams for {count} prompts; pass one, or one per prompt")
        return params

    @staticmethod
    def _adapters_for(count: int, adapter: str | SequenceOf[str | None] | None) -> list[str | None]:
        if adapter is None or isinstance(adapter, str):
            return [adapter] * count
        adapter = list(adapter)
        if len(adapter) != count:
            raise BadRequestError(f"got {len(adapter)} adapters for {count} prompts; pass one, or one per prompt")
        return adapter

    def _run(self, requests: list[tuple[str | None, list[int], SamplingParams, str | None]]) -> list[RequestOutput]:
        """Submit every prompt to the engine at once; step until all are done."""
        engine = self.engine
        ids: list[str] = []
        try:
            for text, token_ids, params, adapter in requests:
                ids.append(engine.add_request(None, token_ids, params, prompt_text=text, adapter=adapter))
        except BaseException:
            for request_id in ids:
                engine.abort(request_id)
            raise
        done: dict[str, RequestOutput] = {}
        try:
            while len(done) < len(ids):
                for output in engine.step():
                    if output.finished:
                        done[output.request_id] = output
        except BaseException:  # an interrupted generate leaves no request behind
            for request_id in ids:
                engine.abort(request_id)
            raise
        return [done[request_id] for request_id in ids]

    # ------------------------------------------------------------ embedding

    @torch.inference_mode()
    def embed(self, texts: str | SequenceOf[str], *, batch_size: int = 32) -> list[EmbeddingRequestOutput]:
        """Embed each text with an embedding model (sentence-transformers pooling)."""
        if self._pooling is None:
            raise BadRequestError(f"model {self.model_name!r} ({self.loaded.architecture}) generates text; "
                                  "embed() needs an embedding model such as a BertModel folder")
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        ids = [row[: self.max_model_len] for row in self.tokenizer.encode_batch(texts)]
        # Longest first, so each batch pads to lengths alike (as sentence-transformers does).
        order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
        vectors: list[Any] = [None] * len(texts)
        device = self.backend.device
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(ids[i]) for i in rows)
            input_ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for row, index in enumerate(rows):
                input_ids[row, : len(ids[index])] = torch.tensor(ids[index])
                mask[row, : len(ids[index])] = 1
            states = self.model(input_ids.to(device), mask.to(device))
            for index, vector in zip(rows, self._pooling(states.float(), mask.to(device)).cpu().tolist()):
                vectors[index] = vector
        return [EmbeddingRequestOutput(request_id=str(next(self._ids)), prompt=text, prompt_token_ids=token_ids,
                                       outputs=EmbeddingOutput(vector))
                for text, token_ids, vector in zip(texts, ids, vectors)]

    def _require_generator(self, what: str) -> None:
        if self._runner is None:
            raise BadRequestError(f"model {self.model_name!r} is an embedding model ({self.loaded.architecture}); "
                                  f"{what}() needs a text-generation model — use embed()")
