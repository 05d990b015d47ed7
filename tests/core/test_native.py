"""enigma.native: the compiled CPU kernels, their build cache, and how they fail."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from enigma import native
from enigma.backends.torch_cpu import CPULinear, TorchCPUBackend


@pytest.fixture(scope="module")
def kernels() -> native.NativeKernels:
    loaded = native.kernels()
    if loaded is None:
        pytest.skip("no C compiler on this machine: the native kernels cannot be built")
    return loaded


@pytest.fixture
def fresh_kernels(monkeypatch):
    """``native.kernels`` looking anew inside the test; the process's kernels are back after it."""
    monkeypatch.setattr(native, "_loaded", {})
    return native.kernels


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 40), in_features=st.integers(1, 70), out_features=st.integers(1, 60),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_matches_torch(kernels, rows, in_features, out_features, bias, seed):
    # up to 4 rows: dot products; more: transposed groups of 16, 8 and dot products for the last few rows,
    # blocks of 24 weight rows, then of 4, then single ones
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    b = torch.randn(out_features, generator=generator) if bias else None
    torch.testing.assert_close(kernels.linear(x, weight, b), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 768), (2, 768), (3, 2048), (9, 768), (32, 768), (2, 5, 768)])
def test_linear_model_sized(kernels, shape):
    x = torch.randn(*shape)
    weight = torch.randn(2306, shape[-1]) * 0.02  # out not a multiple of 4: the one-row tail runs too
    bias = torch.randn(2306)
    result = kernels.linear(x, weight, bias)
    assert result.shape == (*shape[:-1], 2306)
    torch.testing.assert_close(result, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_linear_same_result_on_any_thread_count(kernels):
    x, weight = torch.randn(3, 512), torch.randn(1001, 512)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.linear(x, weight)
        torch.set_num_threads(max(2, threads))
        many = kernels.linear(x, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_linear_reads_a_non_contiguous_input(kernels):
    x = torch.randn(64, 6)[:, :4].T  # [4, 64], strided
    weight = torch.randn(8, 64)
    torch.testing.assert_close(kernels.linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x, weight, message", [
    (torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 4), "float32"),
    (torch.randn(2, 5), torch.randn(3, 4), "do not match"),
    (torch.randn(2, 4), torch.randn(4, 3).T, "not contiguous"),
    (torch.randn(2, 4), torch.randn(3, 4, device="meta"), "weight torch.float32 on meta"),
])
def test_linear_refuses_what_it_cannot_read(kernels, x, weight, message):
    with pytest.raises(ValueError, match=message):
        kernels.linear(x, weight)


@pytest.mark.parametrize("bias, message", [
    (torch.randn(3, dtype=torch.float64), "bias torch.float64"),
    (torch.randn(4), "bias \\(4,\\) do not match"),
])
def test_linear_refuses_a_bias_it_cannot_read(kernels, bias, message):
    with pytest.raises(ValueError, match=message):
        kernels.linear(torch.randn(2, 4), torch.randn(3, 4), bias)


def test_build_is_cached_and_atomic(kernels, tmp_path):
    first = native.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first
    assert first.stat().st_mtime_ns == stamp
    assert [path.name for path in tmp_path.iterdir()] == [first.name]  # no scratch left behind


def test_missing_compiler_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-here")
    with pytest.raises(native.NativeBuildError, match="no-such-compiler-here.*set CC"):
        native.build(tmp_path)


def test_failed_compile_says_why_and_leaves_nothing(tmp_path, monkeypatch):
    script = tmp_path / "broken-cc"
    script.write_text("#!/bin/sh\necho 'error: this compiler is broken' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("CC", str(script))
    cache = tmp_path / "cache"
    with pytest.raises(native.NativeBuildError, match="this compiler is broken"):
        native.build(cache)
    assert list(cache.iterdir()) == []


def test_without_a_compiler_the_backend_keeps_torch(enigma_home, fresh_kernels, monkeypatch, caplog):
    monkeypatch.setenv("CC", "no-such-compiler-here")
    with caplog.at_level(logging.WARNING, logger="enigma.native"):
        assert fresh_kernels() is None
    assert "native CPU kernels unavailable" in caplog.text
    backend = TorchCPUBackend(device="cpu")
    assert backend.native is None
    model = backend.prepare(torch.nn.Sequential(torch.nn.Linear(16, 8)), dtype=torch.float32)
    assert isinstance(model[0], CPULinear) and model[0].native is None
    x = torch.randn(2, 16)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), F.linear(x, model[0].weight, model[0].bias))


def test_switched_off_by_config(enigma_home, fresh_kernels, monkeypatch):
    monkeypatch.setenv("ENIGMA_ENGINE__NATIVE_KERNELS", "false")
    assert fresh_kernels() is None


def test_a_corrupt_cached_library_says_how_to_recover(tmp_path):
    broken = tmp_path / "enigma-kernels-broken.so"
    broken.write_bytes(b"not a library")
    with pytest.raises(native.NativeBuildError, match="delete it to rebuild"):
        native.NativeKernels(broken)


def test_cpu_linear_picks_kernels_by_rows(kernels, monkeypatch):
    linear = torch.nn.Linear(64, 48)
    wrapped = CPULinear(linear, native=kernels, onednn=True)
    calls = []
    monkeypatch.setattr(kernels, "linear", lambda *args: calls.append("native") or F.linear(*args))
    with torch.inference_mode():
        for rows in (1, CPULinear.NATIVE_MAX_ROWS, CPULinear.NATIVE_MAX_ROWS + 1):
            x = torch.randn(rows, 64)
            torch.testing.assert_close(wrapped(x), linear(x), rtol=1e-5, atol=1e-5)
    assert calls == ["native", "native"]  # the 33-row batch ran on oneDNN


def test_cpu_linear_keeps_gradients(kernels):
    linear = torch.nn.Linear(8, 4)
    wrapped = CPULinear(linear, native=kernels, onednn=True)
    x = torch.randn(1, 8, requires_grad=True)
    wrapped(x).sum().backward()
    assert x.grad is not None and linear.weight.grad is not None


def _decode_case(seq_lens, *, heads=4, kv_heads=2, dim=8, block_size=4, num_blocks=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, kv_heads, num_blocks, block_size, dim, generator=generator)
    order = torch.randperm(num_blocks, generator=generator)  # scattered blocks
    width = -(-max(seq_lens) // block_size)
    tables = torch.stack([order[i * width:(i + 1) * width] for i in range(len(seq_lens))])
    query = torch.randn(len(seq_lens), heads, dim, generator=generator)
    return query, cache, tables, torch.tensor(seq_lens)


@pytest.mark.parametrize("window", [None, 3, 100])
@pytest.mark.parametrize("dim, scale", [(8, 0.3), (6, 0.3), (16, 40.0)])  # 6: not in vectors of 8; 40: scores
def test_decode_attention_matches_softmax_over_the_table(kernels, window, dim, scale):  # far apart (e^-87 clamp)
    query, cache, tables, lengths = _decode_case([5, 1, 12, 37], dim=dim, num_blocks=48)
    out = kernels.decode_attention(query, cache, tables, lengths, window=window, scale=scale)
    for s, length in enumerate(lengths.tolist()):
        slots = [(int(tables[s, p // 4]), p % 4) for p in range(length)][-(window or length):]
        keys = torch.stack([cache[0, :, b, o] for b, o in slots], dim=1)      # [kv_heads, n, dim]
        values = torch.stack([cache[1, :, b, o] for b, o in slots], dim=1)
        expected = torch.softmax(query[s].view(2, 2, dim) @ keys.transpose(1, 2) * scale, -1) @ values
        torch.testing.assert_close(out[s], expected.reshape(4, dim), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 7])
def test_decode_attention_of_runs_of_rows_matches_softmax(kernels, window):
    """Blocks of 16 and a head size in vectors of 8: rows of one sequence at consecutive positions (a
    verification) are attended together, the block's keys transposed once; a lone row and a row of another
    table in between end runs."""
    lengths = [20, 21, 22, 23, 24, 9, 40, 41, 42]
    query, cache, tables, lengths = _decode_case(lengths, dim=16, block_size=16, num_blocks=32)
    tables[1:5] = tables[0]
    tables[7:] = tables[6]
    out = kernels.decode_attention(query, cache, tables, lengths, window=window, scale=0.25)
    for s, length in enumerate(lengths.tolist()):
        slots = [(int(tables[s, p // 16]), p % 16) for p in range(length)][-(window or length):]
        keys = torch.stack([cache[0, :, b, o] for b, o in slots], dim=1)
        values = torch.stack([cache[1, :, b, o] for b, o in slots], dim=1)
        expected = torch.softmax(query[s].view(2, 2, 16) @ keys.transpose(1, 2) * 0.25, -1) @ values
        torch.testing.assert_close(out[s], expected.reshape(4, 16), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (lambda tables, lengths: (tables.clone().fill_(99), lengths), "outside the pool of 16"),
    (lambda tables, lengths: (tables[:, :1], lengths), "shorter than their length"),
])
def test_decode_attention_refuses_a_bad_table(kernels, change, message):
    query, cache, tables, lengths = _decode_case([5, 9])
    tables, lengths = change(tables, lengths)
    with pytest.raises(ValueError, match=message):
        kernels.decode_attention(query, cache, tables, lengths, window=None, scale=1.0)


def test_decode_attention_refuses_a_bad_table_for_a_run_of_rows(kernels):
    query, cache, tables, lengths = _decode_case([20, 21, 22], dim=16, block_size=16, num_blocks=8)
    tables[:] = tables[0]
    tables[:, 1] = 99  # the run's second block lies outside the pool: one failure per KV head, not per row
    with pytest.raises(ValueError, match=r"2 \(sequence or run of its rows, KV head\) pairs .* pool of 8"):
        kernels.decode_attention(query, cache, tables, lengths, window=None, scale=1.0)


def test_decode_attention_refuses_mismatched_inputs(kernels):
    query, cache, tables, lengths = _decode_case([5, 9])
    with pytest.raises(ValueError, match="float32 query"):
        kernels.decode_attention(query.double(), cache, tables, lengths, window=None, scale=1.0)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.decode_attention(query[:, :3], cache, tables, lengths, window=None, scale=1.0)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.decode_attention(query, cache, tables, lengths[:1], window=None, scale=1.0)
