"""The torch dequantizers equal gguf's numpy ones bit for bit; GGMLLinear computes with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from enigma_ggml.kernels import GGMLLinear, dequantize_blocks
from enigma_ggml.quants import dequantize, quantize

TYPES = ["F32", "F16", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("type_name", TYPES)
def test_torch_dequantization_equals_gguf(type_name: str) -> None:
    rng = np.random.default_rng(1)
    rows = np.concatenate([rng.standard_normal((12, 512)) * 0.02, rng.uniform(-3, 3, (4, 512)),
                           np.zeros((2, 512))]).astype(np.float32)
    packed = quantize(rows, type_name)
    expected = dequantize(packed, type_name)
    ours = dequantize_blocks(torch.from_numpy(packed), type_name)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == expected.shape
    assert np.array_equal(ours.numpy(), expected)  # bitwise, zeros and signs included


def test_ggml_linear(tmp_path) -> None:
    rng = np.random.default_rng(2)
    weight = (rng.standard_normal((64, 256)) * 0.05).astype(np.float32)
    layer = GGMLLinear(256, 64, "Q4_K", bias=True)
    with torch.no_grad():
        layer.qweight.copy_(torch.from_numpy(quantize(weight, "Q4_K")))
        layer.bias.copy_(torch.arange(64, dtype=torch.float32))
    x = torch.randn(3, 256)
    expected = x @ torch.from_numpy(dequantize(quantize(weight, "Q4_K"), "Q4_K")).T + torch.arange(64.0)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer.qweight.nbytes == 64 * 144  # the file's bytes, not floats
