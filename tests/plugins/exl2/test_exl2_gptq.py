"""GPTQ as EXL2 does it: beats round-to-nearest, and its floats are exactly what the packed tensors say."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from enigma_exl2.gptq import Hessian, prepare, quantize_linear, round_to_nearest
from enigma_exl2.layout import reference_dequantize
from enigma_exl2.qparams import HEAD_OPTIONS, RUNGS, QParams, block_options

from enigma.errors import BadRequestError


def activations(rows: int, features: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs with a few loud channels, as a transformer's are."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) / features ** 0.5
    loud = torch.ones(features)
    loud[torch.randperm(features, generator=generator)[:features // 16]] = 8.0
    return (torch.randn(rows, features, generator=generator) @ mixing + 0.3 * torch.randn(
        rows, features, generator=generator)) * loud


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(96, 336) / 336 ** 0.5, activations(1024, 336)


@pytest.mark.parametrize("qparams", [RUNGS[0], RUNGS[3], RUNGS[5], RUNGS[9], RUNGS[12], RUNGS[15]],
                         ids=lambda q: q.description)
def test_gptq_has_less_output_error_than_rounding(layer, qparams: QParams) -> None:
    weight, x = layer
    hessian = Hessian(x.shape[1])
    hessian.add(x)
    prepared = prepare(hessian.matrix())
    reference = x @ weight.T

    def error(w: torch.Tensor) -> float:
        return float((x @ w.T - reference).norm() / reference.norm())

    gptq = error(quantize_linear(weight, prepared, qparams).weight)
    rounded = error(round_to_nearest(weight, qparams, prepared.perm).weight)
    assert gptq < 0.9 * rounded, (gptq, rounded)


@pytest.mark.parametrize("qparams", [*RUNGS, *HEAD_OPTIONS.values()], ids=lambda q: q.description)
def test_reference_dequantizer_gives_gptqs_floats_exactly(layer, qparams: QParams) -> None:
    weight, x = layer
    hessian = Hessian(x.shape[1])
    hessian.add(x[:256])
    result = quantize_linear(weight, prepare(hessian.matrix()), qparams)
    tensors = result.tensors()
    numpy = {name: t.numpy() for name, t in tensors.items()}
    assert np.array_equal(reference_dequantize(numpy, 336, 96), result.weight.numpy())
    stored = sum(t.numel() * t.element_size() * 8 for t in tensors.values())
    assert stored == qparams.total_bits(336, 96)              # the optimiser's count is the bytes on disk


def test_more_bits_less_error(layer) -> None:
    weight, x = layer
    hessian = Hessian(x.shape[1])
    hessian.add(x)
    prepared = prepare(hessian.matrix())
    errors = [float((quantize_linear(weight, prepared, q).weight - weight).norm()) for q in
              (RUNGS[0], RUNGS[5], RUNGS[12], RUNGS[15])]
    assert errors == sorted(errors, reverse=True)


def test_option_ladders_rise_from_about_2_to_8_bits() -> None:
    for block, shapes in (("attention", {"q_proj": (256, 256), "k_proj": (256, 128), "v_proj": (256, 128),
                                         "o_proj": (256, 256)}),
                          ("mlp", {"gate_proj": (256, 688), "up_proj": (256, 688), "down_proj": (688, 256)})):
        numel = sum(r * c for r, c in shapes.values())
        bpw = [sum(o[n].total_bits(*shapes[n]) for n in o) / numel for o in block_options(block)]
        assert 2.2 < min(bpw) < 2.6 and 8.0 < max(bpw) < 8.7


def test_bad_recipes_are_refused() -> None:
    with pytest.raises(BadRequestError, match="sum to 1"):
        QParams((4, 3), (0.5, 0.6), (64, 64))
    with pytest.raises(BadRequestError, match="multiples of 32"):
        QParams((4,), (1.0,), (48,))
    with pytest.raises(BadRequestError, match="bit widths"):
        QParams((7,), (1.0,), (64,))
    with pytest.raises(BadRequestError, match="no calibration inputs"):
        Hessian(8).matrix()
