"""The torch dequantizers equal gguf's numpy ones bit for bit; GGMLLinear computes with them."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from enigma_ggml.kernels import GGMLLinear, dequantize_blocks
from enigma_ggml.quants import dequantize, quantize

TYPES = ["F32", "F16", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
GGUF_QUANTIZED = ["BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # quantized by the gguf package, read by the loader


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


@pytest.mark.parametrize("type_name", GGUF_QUANTIZED)
def test_the_other_block_types_equal_gguf(type_name: str) -> None:
    kind = gguf.GGMLQuantizationType[type_name]
    rows = np.random.default_rng(3).standard_normal((8, 256)).astype(np.float32)
    packed = gguf.quants.quantize(rows, kind)
    ours = dequantize_blocks(torch.from_numpy(packed), type_name)
    assert np.array_equal(ours.numpy(), gguf.quants.dequantize(packed, kind))


@pytest.mark.parametrize("type_name", ["Q2_K", "Q3_K", "IQ4_NL"])
def test_types_without_a_torch_dequantizer_use_ggufs(type_name: str) -> None:
    kind = gguf.GGMLQuantizationType[type_name]
    values, size = gguf.GGML_QUANT_SIZES[kind]
    packed = np.random.default_rng(4).integers(0, 256, (4, 2 * size), dtype=np.uint8)
    for block in range(2):  # finite scales: the f16 "d" is each block's first two bytes in these types
        offset = block * size + (0 if type_name == "IQ4_NL" else size - 2)
        packed[:, offset:offset + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    ours = dequantize_blocks(torch.from_numpy(packed), type_name)
    assert ours.shape == (4, 2 * values)
    assert np.array_equal(ours.numpy(), gguf.quants.dequantize(packed, kind))


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
