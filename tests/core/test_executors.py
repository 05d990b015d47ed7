"""The executor kind: where forward passes run below the engine (``local`` builtin; plugins add more)."""

from __future__ import annotations

import types

import pytest

from enigma import LLM, SamplingParams, hookimpl
from enigma.errors import ConfigError
from enigma.runner import LocalExecutor, ModelRunner

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def test_hook_enigma_register_executors(make_plugin_host, tiny_model):
    folder = tiny_model("llama-gqa")
    expected = LLM(folder).generate("Hello", GREEDY)[0].outputs[0].token_ids
    seen = []

    class ClosingRunner(ModelRunner):
        def close(self) -> None:
            seen.append("closed")

    class RecordingExecutor:
        """Runs in this process, and remembers what it was asked for."""

        def create_runner(self, loaded, backend, *, block_size, options):
            seen.append(options)
            return ClosingRunner(loaded, backend, block_size=block_size)

    @hookimpl
    def enigma_register_executors(register):
        register("tensor-parallel", RecordingExecutor, summary="a test executor")

    make_plugin_host(install=True)  # the builtins alone: only the local executor
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 needs the tensor-parallel executor: "
                                          "pip install enigma-plugin-zero"):
        LLM(folder, tensor_parallel_size=2)

    plugin = types.ModuleType("executor_plugin")
    plugin.enigma_register_executors = enigma_register_executors
    host = make_plugin_host(plugin, install=True)
    assert host.registry.get("executor", "tensor-parallel").plugin == "executor_plugin"
    assert isinstance(host.create("executor", "local"), LocalExecutor)
    llm = LLM(folder, tensor_parallel_size=2, backend="torch")
    assert llm.generate("Hello", GREEDY)[0].outputs[0].token_ids == expected
    options = seen[0]
    assert (options.tensor_parallel_size, options.backend) == (2, "torch")
    llm.engine.close()
    assert seen[-1] == "closed"


def test_the_local_executor_runs_one_process(tiny_model):
    with pytest.raises(ConfigError, match="tensor_parallel_size=0: give 1 or more processes"):
        LLM(tiny_model("llama-gqa"), tensor_parallel_size=0)
