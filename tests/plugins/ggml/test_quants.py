"""enigma-plugin-ggml's block codecs against libggml: the same bytes for the same float32 rows."""

from __future__ import annotations

import numpy as np
import pytest
from enigma_ggml import BLOCKS, dequantize, quantize, row_bytes

from enigma.errors import BadRequestError

GGML_TYPE = {"Q8_0": 8, "Q5_0": 6, "Q5_1": 7, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}


def samples() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    mixed = rng.standard_normal((24, 512)).astype(np.float32)
    mixed[:, :300] = 0  # whole zero sub-blocks and blocks
    mixed[3] = 0
    mixed[5, ::2] = 1e-3
    mixed[6] = 7.0  # constant rows
    return {
        "weights": (rng.standard_normal((32, 1024)) * 0.02).astype(np.float32),
        "uniform": rng.uniform(-1, 1, (16, 768)).astype(np.float32),
        "heavy-tailed": (rng.standard_t(2, (16, 512)) * 0.1).astype(np.float32),
        "mixed": mixed,
        "tiny": (rng.standard_normal((8, 256)) * 1e-6).astype(np.float32),
    }


@pytest.mark.parametrize("type_name", list(GGML_TYPE))
@pytest.mark.parametrize("sample", list(samples()))
def test_bytes_equal_llama_cpps(type_name: str, sample: str, libggml) -> None:
    rows = samples()[sample]
    expected = np.zeros((rows.shape[0], row_bytes(type_name, rows.shape[1])), dtype=np.uint8)
    libggml.ggml_quantize_chunk(GGML_TYPE[type_name], rows.ctypes.data, expected.ctypes.data, 0, rows.shape[0],
                                rows.shape[1], None)
    ours = quantize(rows, type_name)
    assert ours.shape == expected.shape
    mismatched = np.nonzero((ours != expected).any(axis=1))[0]
    assert mismatched.size == 0, f"rows {mismatched[:5].tolist()} differ"


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16"])
def test_round_trip_error_shrinks_with_bits(type_name: str) -> None:
    rows = samples()["weights"]
    back = dequantize(quantize(rows, type_name), type_name)
    assert back.shape == rows.shape and back.dtype == np.float32
    relative = np.sqrt(((back - rows) ** 2).mean() / (rows ** 2).mean())
    bound = {"Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03, "Q8_0": 0.01, "F16": 1e-3}[type_name]
    assert relative < bound
    assert quantize(rows, type_name).shape[1] * 8 / rows.shape[1] == pytest.approx(
        8 * BLOCKS[type_name][1] / BLOCKS[type_name][0])


def test_bad_rows_are_refused() -> None:
    with pytest.raises(BadRequestError, match="Q4_K packs rows in blocks of 256 values; a row of 300"):
        quantize(np.zeros((2, 300), np.float32), "Q4_K")
    with pytest.raises(BadRequestError, match="unknown ggml type 'Q4_X'; known: F32, F16, Q8_0, Q5_0"):
        quantize(np.zeros((2, 256), np.float32), "Q4_X")
