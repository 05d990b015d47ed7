"""The block kernels: llama.cpp's arithmetic (activations quantized per block, integer dot products), checked
against a numpy reference of the same steps and against dequantize -> F.linear."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from enigma_ggml.kernels import NATIVE_TYPES, GGMLLinear, dequantize_blocks, native_qmatmul, qmatmul
from enigma_ggml.quants import quantize
from hypothesis import given, settings
from hypothesis import strategies as st

from enigma.errors import BadRequestError

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(native_qmatmul() is None, reason="no C compiler: the block kernels are not built")


K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")


def pack(weight: np.ndarray, type_name: str) -> torch.Tensor:
    """llama.cpp's bytes: the plugin's k-quant quantizers, the gguf package's for the 32-value types."""
    if type_name in K_QUANTS:
        return torch.from_numpy(quantize(weight, type_name))
    return torch.from_numpy(gguf.quants.quantize(weight, gguf.GGMLQuantizationType[type_name]))


def q8_reference(x: np.ndarray, type_name: str) -> np.ndarray:
    """The activations as the kernels quantize them, back in float32: Q8_0 (half scale per 32, ggml's
    quantize_row_q8_0_ref) for the 32-value types, Q8_K (float scale per 256, quantize_row_q8_K_ref) for
    the k-quants."""
    if type_name not in K_QUANTS:
        blocks = x.reshape(-1, 32)
        d = (np.abs(blocks).max(-1, keepdims=True) / 127).astype(np.float32)
        inverse = np.divide(1, d, out=np.zeros_like(d), where=d != 0)
        q = np.trunc(blocks * inverse + np.copysign(np.float32(0.5), blocks * inverse))  # roundf: half away
        return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)
    blocks = x.reshape(-1, 256)
    index = np.abs(blocks).argmax(-1)
    peak = blocks[np.arange(len(blocks)), index][:, None]
    iscale = np.divide(np.float32(-127), peak, out=np.zeros_like(peak), where=peak != 0)
    q = np.minimum(np.rint(iscale * blocks), 127)  # rint: ties to even, as ggml's nearest_int
    d = np.divide(1, iscale, out=np.zeros_like(iscale), where=iscale != 0).astype(np.float32)
    return (q * d).reshape(x.shape)


@settings(max_examples=25, deadline=None)
@given(type_name=st.sampled_from(sorted(NATIVE_TYPES)), rows=st.integers(1, 9), out=st.integers(1, 40),
       blocks=st.integers(1, 4), scale=st.sampled_from([1e-3, 0.05, 3.0]), seed=st.integers(0, 2**16))
def test_block_kernels_equal_the_reference_arithmetic(type_name, rows, out, blocks, scale, seed) -> None:
    rng = np.random.default_rng(seed)
    values = blocks * (256 if type_name in K_QUANTS else 32)
    weight = (rng.standard_normal((out, values)) * scale).astype(np.float32)
    x = (rng.standard_normal((rows, values)) * scale).astype(np.float32)
    x[0, :7] = 0.0  # zeros and a whole zero block where there is room
    if rows > 1:
        x[1] = 0.0
    packed = pack(weight, type_name)
    expected = q8_reference(x, type_name).astype(np.float64) @ dequantize_blocks(packed, type_name).double().numpy().T
    got = qmatmul(torch.from_numpy(x), packed, type_name).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("type_name", sorted(NATIVE_TYPES))
def test_close_to_dequantize_then_linear(type_name: str) -> None:
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((96, 1024)) * 0.02).astype(np.float32)
    layer = GGMLLinear(1024, 96, type_name, bias=True)
    with torch.no_grad():
        layer.qweight.copy_(pack(weight, type_name))
        layer.bias.copy_(torch.linspace(-1, 1, 96))
    x = torch.from_numpy(rng.standard_normal((3, 1024)).astype(np.float32))
    reference = torch.nn.functional.linear(x, layer.weight_values(), layer.bias)
    with torch.no_grad():
        got = layer(x)  # 3 rows: the block kernels
        many = x.repeat(10, 1)  # 30 rows: the weight dequantized (a piece at a time), then a float GEMM
        torch.testing.assert_close(layer(many), torch.nn.functional.linear(many, layer.weight_values(), layer.bias),
                                   rtol=1e-5, atol=1e-5)
    relative = ((got - reference).norm() / (reference - layer.bias).norm()).item()
    assert relative < 0.01  # 8-bit activations: llama.cpp's error, measured ~0.6 %


def test_bad_inputs_are_refused() -> None:
    packed = torch.from_numpy(quantize(np.zeros((4, 256), np.float32), "Q4_K"))
    with pytest.raises(BadRequestError, match="the block kernels take .*, not Q2_K"):
        qmatmul(torch.zeros(1, 256), packed, "Q2_K")
    with pytest.raises(BadRequestError, match="float32 CPU rows"):
        qmatmul(torch.zeros(1, 256, dtype=torch.float64), packed, "Q4_K")
    with pytest.raises(BadRequestError, match="do not hold 512 values"):
        qmatmul(torch.zeros(1, 512), packed, "Q4_K")


def test_many_rows_dequantize_a_piece_at_a_time(monkeypatch) -> None:
    import enigma_ggml.kernels as kernels

    monkeypatch.setattr(kernels, "CHUNK_BYTES", 64 * 256 * 4)  # 64 features a piece: 5 pieces, the last short
    rng = np.random.default_rng(6)
    weight = (rng.standard_normal((300, 256)) * 0.02).astype(np.float32)
    packed = pack(weight, "Q4_K")
    x = torch.from_numpy(rng.standard_normal((40, 256)).astype(np.float32))
    expected = x @ dequantize_blocks(packed, "Q4_K").T
    with torch.no_grad():
        got = kernels.packed_linear(x, packed, "Q4_K", 256)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("type_name", sorted(NATIVE_TYPES))
def test_dequantization_is_ggufs_bit_for_bit(type_name: str) -> None:
    rng = np.random.default_rng(5)
    weight = np.concatenate([rng.standard_normal((6, 512)) * 0.02, rng.uniform(-4, 4, (2, 512)),
                             np.zeros((1, 512))]).astype(np.float32)
    layer = GGMLLinear(512, 9, type_name)
    packed = pack(weight, type_name).numpy()
    with torch.no_grad():
        layer.qweight.copy_(torch.from_numpy(packed))
    assert np.array_equal(layer.weight_values().numpy(), gguf.quants.dequantize(
        packed, gguf.GGMLQuantizationType[type_name]))
