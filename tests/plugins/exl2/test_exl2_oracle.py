"""The oracle, on a CUDA machine: exllamav2 loads enigma's EXL2 output of enigma-tiny and gives enigma's logits.

exllamav2 runs only on CUDA (it compiles its extension on first import), so this test runs where a GPU is and
exllamav2 is installed (``benchmarks/device/check.sh`` carries its wheel there); elsewhere it skips. enigma's
side is its reference path: the same folder loaded by enigma in float32 on the CPU, and on the GPU through the
plugin's Triton kernel. Both read the same quantized weights, so what differs is exllamav2's float16
arithmetic; the measured differences are printed for BENCHMARKS.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from enigma.llm import resolve_model_path
from enigma.loader import load_model
from enigma.quantize import quantize
from enigma.tokenizer import Tokenizer
from enigma.training.attention import training_context

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="exllamav2 runs on CUDA devices only")]

TEXT = ("The Python Tutorial. Python is an easy to learn, powerful programming language. It has efficient "
        "high-level data structures and a simple but effective approach to object-oriented programming. Python's "
        "elegant syntax and dynamic typing, together with its interpreted nature, make it an ideal language for "
        "scripting and rapid application development in many areas on most platforms.")


def enigma_logits(folder: Path, ids: list[int], device: str) -> torch.Tensor:
    model = load_model(folder, dtype="float32", device=device).model
    with torch.no_grad():
        hidden = model(torch.tensor(ids, device=device), torch.arange(len(ids), device=device),
                       training_context(model.num_layers, 1, len(ids)))
        return model.compute_logits(hidden).float().cpu()


def exllamav2_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ".".join(map(str, torch.cuda.get_device_capability())))
    exllamav2 = pytest.importorskip("exllamav2", reason="pip install exllamav2 (the oracle; CUDA only)")
    config = exllamav2.ExLlamaV2Config(str(folder))
    model = exllamav2.ExLlamaV2(config)
    model.load()
    with torch.no_grad():
        logits = model.forward(torch.tensor([ids]))
    model.unload()
    return logits[0].float().cpu()


@pytest.mark.parametrize("bpw", [4.0, 6.0])
def test_exllamav2_loads_enigmas_exl2_output_and_gives_its_logits(tmp_path, bpw):
    tiny = resolve_model_path("enigma-tiny")
    folder = quantize(tiny, "EXL2", output=tmp_path / f"tiny-{bpw}",
                      options={"bpw": bpw, "work_dir": str(tmp_path / "work"), "calibration_rows": 8,
                               "calibration_length": 256})
    ids = Tokenizer(tiny).encode(TEXT)[:96]
    ours = torch.log_softmax(enigma_logits(folder, ids, "cpu"), dim=-1)
    ours_cuda = torch.log_softmax(enigma_logits(folder, ids, "cuda"), dim=-1)
    theirs = torch.log_softmax(exllamav2_logits(folder, ids), dim=-1)
    assert theirs.shape == ours.shape
    for name, other in (("exllamav2", theirs), ("enigma cuda", ours_cuda)):
        difference = (other - ours).abs()
        agreement = (other.argmax(-1) == ours.argmax(-1)).float().mean().item()
        print(f"\n{bpw} bpw, {name} vs enigma cpu over {len(ids)} positions: log-prob max |diff| "
              f"{difference.max().item():.4f}, mean {difference.mean().item():.5f}, top-1 agreement {agreement:.3f}")
        # float16 activations against float32: small differences, the same predictions
        assert difference.mean().item() < 0.02 and difference.max().item() < 0.5
        assert agreement >= 0.95
