"""pytest fixtures for testing enigma plugins against a real kernel.

Installed as a ``pytest11`` plugin with enigma-core, so any test suite that
has enigma-core installed gets these fixtures:

``enigma_home``
    an empty ``ENIGMA_HOME`` for the test (config, store, cache), so tests
    never touch the user's files.
``plugin_host``
    a fresh :class:`~enigma.plugins.PluginHost` loaded from the installed
    entry points, exactly as ``enigma`` loads them.
``make_plugin_host``
    ``make_plugin_host(my_plugin_module, builtins=True, install=False)``: a
    host with your (not yet installed) plugin registered beside the builtins;
    assert on ``host.records``, ``host.registry`` and ``host.select(...)``.
    With ``install=True`` it is the host the process uses for the test —
    ``LLM``, the loader, the engine and the server all see your plugin.
``tiny_llama``
    the folder of a random two-layer Llama with a byte-level tokenizer, made
    with enigma alone (no download, no transformers), once per session.
``run_engine``
    ``run_engine(host, prompts, scheduler=..., cache=..., max_tokens=8)``:
    real engine steps with your scheduler or cache (or any kind: pass the
    names) on ``tiny_llama``; checks what every implementation must give —
    each request finishes, greedy tokens equal those of the builtins, no KV
    block is left in use — and returns the outputs and the engine.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import pytest

from enigma.plugins import CORE_DISTRIBUTION, PluginHost, installed_entry_points, load_plugins, reset_host, use_host


@pytest.fixture
def enigma_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An isolated ENIGMA_HOME; enigma's environment variables cleared."""
    home = tmp_path / "enigma-home"
    home.mkdir()
    for name in list(os.environ):
        if name.startswith("ENIGMA_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ENIGMA_HOME", str(home))
    reset_host()
    yield home
    reset_host()


@pytest.fixture
def plugin_host(enigma_home: Path) -> PluginHost:
    """A host loaded from the installed ``enigma`` entry points."""
    return load_plugins()


@pytest.fixture
def make_plugin_host(enigma_home: Path) -> Iterator[Callable[..., PluginHost]]:
    """Build a host holding the given plugin modules (and, by default, the builtins)."""

    installed: list[Any] = []

    def make(*modules: ModuleType, builtins: bool = True, install: bool = False) -> PluginHost:
        host = builtin_host() if builtins else PluginHost()
        for module in modules:
            host.register_module(module, name=module.__name__.rsplit(".", 1)[-1])
        if install:
            context = use_host(host)
            context.__enter__()
            installed.append(context)
        return host

    yield make
    for context in reversed(installed):
        context.__exit__(None, None, None)


def builtin_host() -> PluginHost:
    """A host holding enigma-core's builtins and nothing else installed."""
    host = PluginHost()
    host.load_entry_points(load=[name for name, owners in installed_entry_points().items()
                                 if owners[0][0] == CORE_DISTRIBUTION])
    return host


def make_tiny_llama(folder: Path, *, seed: int = 0, layers: int = 2, hidden_size: int = 64) -> Path:
    """Write a random Llama (GQA, ``layers`` layers) with a byte-level tokenizer into ``folder``.

    Its 258 tokens are the 256 bytes, ``<s>`` and ``</s>`` (the EOS); made
    with enigma's own model code and ``tokenizers``, so it needs no download.
    """
    import json

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from enigma.models.llama import LlamaForCausalLM
    from enigma.saving import save_model_folder
    from enigma.training.sft import init_weights

    folder.mkdir(parents=True, exist_ok=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={char: index for index, char in enumerate(sorted(alphabet))}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": tokenizer.get_vocab_size(),
              "hidden_size": hidden_size, "intermediate_size": hidden_size * 2, "num_hidden_layers": layers,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 256, "eos_token_id": 257,
              "torch_dtype": "float32"}
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_hf_config(config)
    init_weights(model, std=0.2)
    return save_model_folder(model, config, folder, tokenizer_folder=folder)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random two-layer Llama folder with a byte-level tokenizer (see :func:`make_tiny_llama`)."""
    return make_tiny_llama(tmp_path_factory.mktemp("enigma-tiny-llama"))


@attrs.frozen
class EngineRun:
    """What :func:`run_engine` ran: the outputs (in prompt order) and the engine (its stats, its parts)."""

    outputs: list[Any]
    engine: Any


DEFAULT_PROMPTS = ("The quick brown fox", "Paged attention", "a" * 40, "Hello, world! " * 3)


@pytest.fixture
def run_engine(tiny_llama: Path) -> Callable[..., EngineRun]:
    """Run real engine steps with a plugin's implementation; check the contract every one must keep."""
    from enigma import LLM, SamplingParams

    reference: dict[tuple, list[list[int]]] = {}

    def run(host: PluginHost, prompts: Sequence[str] = DEFAULT_PROMPTS, *, scheduler: str = "auto",
            cache: str = "auto", backend: str = "auto", max_tokens: int = 8, num_kv_blocks: int = 64,
            max_num_seqs: int = 8, max_num_batched_tokens: int = 64) -> EngineRun:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        sizes = dict(num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=max_num_batched_tokens, block_size=4)
        key = (tuple(prompts), max_tokens, tuple(sorted(sizes.items())))
        if key not in reference:  # what the builtins give, on a host of builtins only
            with use_host(builtin_host()):
                outs = LLM(tiny_llama, scheduler="continuous", cache="paged", backend="torch",
                           **sizes).generate(list(prompts), params)
            reference[key] = [out.outputs[0].token_ids for out in outs]
        with use_host(host):
            llm = LLM(tiny_llama, scheduler=scheduler, cache=cache, backend=backend, **sizes)
            outputs = llm.generate(list(prompts), params)
        got = [out.outputs[0].token_ids for out in outputs]
        assert all(out.finished for out in outputs), "a request did not finish"
        assert got == reference[key], (f"greedy tokens differ from the builtins': {got} != {reference[key]}; "
                                       f"finish reasons {[out.outputs[0].finish_reason for out in outputs]}")
        used = llm.engine.stats().get("kv_blocks_used")
        assert used is not None, "the cache's stats() has no 'kv_blocks_used'"
        assert used == 0, f"{used} KV blocks are still in use after every request finished"
        return EngineRun(outputs, llm.engine)

    return run
