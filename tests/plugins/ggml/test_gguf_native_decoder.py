"""GGUF models in the core's native decoder: the block kernels run inside the one-call decode step,
with the same numbers as the torch path (which calls the same kernels one Linear at a time)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from enigma_ggml.export import write_gguf
from enigma_ggml.kernels import GGMLLinear

from enigma import LLM, SamplingParams, native
from enigma.backends.torch_cpu import TorchCPUBackend
from enigma.llm import resolve_model_path
from enigma.loader import load_model
from enigma.runner import ModelRunner, SequenceChunk
from enigma.testing import make_tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(native.kernels() is None, reason="no C compiler: the native kernels cannot be built")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("gguf-native") / "llama", layers=2, hidden_size=256, seed=9)


@pytest.mark.parametrize("file_type", ["Q8_0", "Q4_K_M", "Q6_K"])
def test_block_kernels_in_the_native_decoder_equal_the_torch_path(folder: Path, tmp_path: Path, file_type: str):
    write_gguf(folder, tmp_path / "m.gguf", file_type)
    runners = [ModelRunner(load_model(resolve_model_path(tmp_path / "m.gguf")), TorchCPUBackend(), block_size=4,
                           num_blocks=32) for _ in range(2)]
    fused, plain = runners
    assert fused.model.fused_layers is not None
    assert isinstance(fused.model.model.layers[0].self_attn.o_proj, GGMLLinear)
    plain.model.fused_layers.enabled = False
    prompt = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111]
    steps = [[SequenceChunk(prompt[:8], 0, [3, 9, 4])], [SequenceChunk(prompt[8:], 8, [3, 9, 4]),
                                                         SequenceChunk([72, 105], 0, [7])]]
    steps += [[SequenceChunk([100 + i], 10 + i, [3, 9, 4, 12]), SequenceChunk([50 + i], 2 + i, [7, 15])]
              for i in range(4)]
    for chunks in steps:
        expected, got = plain.execute(chunks).last, fused.execute(chunks).last
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_greedy_tokens_equal_the_torch_path(folder: Path, tmp_path: Path):
    write_gguf(folder, tmp_path / "m.gguf", "Q4_K_M")
    params = SamplingParams(temperature=0, max_tokens=20, min_tokens=20)
    prompts = ["The history of", "Hello, world"]
    fused = LLM(str(tmp_path / "m.gguf"))
    plain = LLM(str(tmp_path / "m.gguf"))
    plain.engine.runner.model.fused_layers.enabled = False
    ours, theirs = fused.generate(prompts, params), plain.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in ours] == [t.outputs[0].token_ids for t in theirs]
