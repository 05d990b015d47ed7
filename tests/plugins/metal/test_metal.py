"""The metal backend: on Linux it says why it cannot run; on an Apple GPU it runs the engine (tested only where
torch's MPS device exists)."""

from __future__ import annotations

import math
import platform
import sys
from pathlib import Path

import pytest
import torch

from enigma import LLM, NotAvailableError, SamplingParams
from enigma.plugins import load_plugins

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

HAS_MPS = torch.backends.mps.is_available()


@pytest.mark.skipif(HAS_MPS, reason="this machine has an MPS device")
def test_unavailable_here_says_why_and_what_to_use():
    registry = load_plugins().registry
    with pytest.raises(NotAvailableError) as error:
        registry.create("backend", "metal")
    message = str(error.value)
    assert "backend 'metal' (from enigma-plugin-metal) is not available here" in message
    assert "MPS" in message and "torch-cpu" in message
    if platform.system() != "Darwin":
        assert f"this is {platform.system()}" in message
    assert registry.select("backend").name != "metal"


@pytest.mark.skipif(HAS_MPS, reason="this machine has an MPS device")
def test_the_backend_refuses_to_start_without_mps():
    from enigma_metal.backend import MetalBackend

    from enigma.errors import BadRequestError

    with pytest.raises(BadRequestError, match="needs torch's MPS device"):
        MetalBackend()
    with pytest.raises(BadRequestError, match="runs on the MPS device, not on cpu"):
        MetalBackend(device="cpu")


@pytest.mark.skipif(not HAS_MPS, reason="needs torch's MPS device (macOS on Apple silicon)")
def test_same_greedy_tokens_as_the_cpu(tmp_path):
    from tiny_models import make_model

    folder = make_model(tmp_path / "m", "llama-gqa", seed=5)
    prompts = [[0, 11, 12, 13], [0, *range(20, 60)]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    expected = LLM(folder, backend="torch", device="cpu", dtype="float32").generate(prompts, params)
    got = LLM(folder, backend="metal", dtype="float32").generate(prompts, params)
    for mine, theirs in zip(got, expected):
        assert mine.outputs[0].token_ids == theirs.outputs[0].token_ids
        token = mine.outputs[0].token_ids[0]
        assert math.isclose(mine.outputs[0].logprobs[0][token].logprob,
                            theirs.outputs[0].logprobs[0][token].logprob, abs_tol=1e-3)
