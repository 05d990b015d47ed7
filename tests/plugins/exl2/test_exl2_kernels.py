"""enigma's EXL2 matmuls — native CPU, Triton (interpreted on the CPU), tensor ops — against the reference
dequantizer written from the format."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from enigma_exl2 import kernels
from enigma_exl2.gptq import Hessian, prepare, quantize_linear
from enigma_exl2.kernels import EXL2Linear
from enigma_exl2.layout import reference_dequantize
from enigma_exl2.qparams import RUNGS, QParams
from hypothesis import given, settings
from hypothesis import strategies as st

from enigma.errors import BadRequestError

MIXED = QParams((8, 4, 3, 2), (0.1, 0.2, 0.3, 0.4), (32, 64, 128, 64))
"""Four widths in one Linear, group sizes differing per width."""


def quantized(in_features: int, out_features: int, qparams: QParams, seed: int = 0,
              bias: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    x = torch.randn(4 * in_features, in_features, generator=generator)
    hessian = Hessian(in_features)
    hessian.add(x)
    result = quantize_linear(weight, prepare(hessian.matrix()), qparams)
    tensors = result.tensors(torch.randn(out_features, generator=generator) if bias else None)
    dense = torch.from_numpy(reference_dequantize({k: v.numpy() for k, v in tensors.items()}, in_features,
                                                  out_features))
    return tensors, dense


def module(tensors: dict[str, torch.Tensor], in_features: int, out_features: int) -> EXL2Linear:
    return EXL2Linear.from_tensors(tensors, in_features, out_features)


@pytest.fixture
def tensor_ops_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(kernels._native, "library", None)


@settings(max_examples=25, deadline=None)
@given(in_features=st.sampled_from([64, 96, 336, 688]), out_features=st.integers(1, 150),
       rows=st.sampled_from([1, 2, 5, 16, 17, 40]), rung=st.integers(0, len(RUNGS) - 1), bias=st.booleans())
def test_native_kernel_matches_the_reference(in_features: int, out_features: int, rows: int, rung: int,
                                             bias: bool) -> None:
    assert kernels.native_library() is not None, "the C compiler should build exl2_matmul.c here"
    tensors, dense = quantized(in_features, out_features, RUNGS[rung], seed=rows, bias=bias)
    linear = module(tensors, in_features, out_features)
    x = torch.randn(rows, in_features)
    expected = x @ dense.T + (tensors["bias"].float() if bias else 0)
    with torch.no_grad():
        got = linear(x)
    assert got.shape == (rows, out_features)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert np.array_equal(linear.weight_values().numpy(), dense.numpy())


def test_mixed_widths_and_padded_columns(tensor_ops_only) -> None:
    tensors, dense = quantized(688, 200, MIXED)
    assert tensors["q_weight"].shape[1] == 224 and tensors["q_scale"].shape == (tensors["q_scale_max"].shape[0], 28)
    x = torch.randn(3, 688)
    for native in (False, True):
        if native:
            kernels._native.pop("library")               # built again: the compiled kernel this time
        with torch.no_grad():
            torch.testing.assert_close(module(tensors, 688, 200)(x), x @ dense.T, rtol=1e-4, atol=1e-3)


def test_tensor_operations_path_on_its_own(tensor_ops_only) -> None:
    tensors, dense = quantized(336, 96, RUNGS[4], bias=True)
    linear = module(tensors, 336, 96)
    x = torch.randn(2, 7, 336)
    torch.testing.assert_close(linear(x), x @ dense.T + tensors["bias"].float(), rtol=1e-4, atol=1e-3)


def test_triton_kernel_matches_the_reference_interpreted(tmp_path) -> None:
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, {tests!r})
        from test_exl2_kernels import MIXED, module, quantized
        from enigma_exl2.qparams import RUNGS
        from enigma_exl2.triton_matmul import exl2_matmul
        for qparams, shape in ((MIXED, (688, 200)), (RUNGS[0], (96, 40)), (RUNGS[13], (336, 64))):
            tensors, dense = quantized(*shape, qparams)
            linear = module(tensors, *shape)
            plan = linear.plan()
            for rows in (1, 5, 70):
                x = torch.randn(rows, shape[0])
                got = exl2_matmul(x[:, plan.perm].contiguous(), linear, plan)
                torch.testing.assert_close(got, x @ dense.T, rtol=1e-4, atol=1e-3)
        print("triton ok")
    """).format(tests=os.path.dirname(__file__))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0 and "triton ok" in result.stdout, result.stderr[-3000:]


def test_native_projection_runs_rows_like_forward() -> None:
    from enigma.native.decoder import NativeProjection

    tensors, dense = quantized(96, 40, RUNGS[6])
    projection = module(tensors, 96, 40).native_projection()
    assert isinstance(projection, NativeProjection) and projection.scratch_bytes_per_row == 4 * 96
    library = kernels.native_library()
    x = torch.randn(3, 96)
    y = torch.empty(3, 40)
    scratch = torch.empty(3 * 96, dtype=torch.float32)
    assert library.enigma_exl2_qmatmul(0, projection.weight.data_ptr(), 40, 96, x.data_ptr(), 3,
                                       scratch.data_ptr(), y.data_ptr(), 1) == 0
    torch.testing.assert_close(y, x @ dense.T, rtol=1e-4, atol=1e-3)
    assert library.enigma_exl2_qmatmul(0, projection.weight.data_ptr(), 41, 96, x.data_ptr(), 3,
                                       scratch.data_ptr(), y.data_ptr(), 1) != 0   # wrong shape: refused


def test_inconsistent_tensors_are_refused() -> None:
    tensors, _ = quantized(96, 40, RUNGS[6])
    short = {**tensors, "q_weight": tensors["q_weight"][:-2]}
    with pytest.raises(BadRequestError, match="covers 80 rows of a Linear with 96"):
        module(short, 96, 40)(torch.randn(1, 96))
    with pytest.raises(BadRequestError, match="covers"):
        module(tensors, 128, 40)(torch.randn(1, 128))
