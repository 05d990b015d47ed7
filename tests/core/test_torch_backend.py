"""The reference backend's paged attention against attention on contiguous tensors."""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from enigma.attention import AttentionMetadata
from enigma.backends.torch_backend import TorchBackend, gather_kv, write_kv
from enigma.backends.torch_cpu import TorchCPUBackend, block_runs
from enigma.kinds import Backend


def reference_attention(query, keys, values, scale, window=None):
    """softmax(QKᵀ)V for the last len(query) positions of contiguous keys/values, float64."""
    q_len, seq_len = query.shape[0], keys.shape[0]
    groups = query.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(groups, 1)
    v = values.double().repeat_interleave(groups, 1)
    scores = torch.einsum("qhd,shd->hqs", query.double(), k) * scale
    q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
    k_pos = torch.arange(seq_len)[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqs,shd->qhd", scores.softmax(-1), v)


DECODE_PATHS = ["reference", "padded", "in-place", "native"]
"""How decode-only steps attend: the reference backend's gathers; torch-cpu's padded batch, its per-sequence
in-place reads, or the native kernel."""


def run_case(query_lens, seq_lens, *, heads=4, kv_heads=2, dim=8, block_size=4, window=None, seed=0,
             layout="views", decodes="padded"):
    generator = torch.Generator().manual_seed(seed)
    metadata = AttentionMetadata.contiguous(query_lens, seq_lens, block_size=block_size,
                                            sliding_window=window)
    if layout != "views":  # scatter the blocks: reverse the pool's order, so every block is a run of its own
        top = int(metadata.block_tables.max())
        tables = top - metadata.block_tables
        metadata = attrs.evolve(metadata, block_tables=tables,
                                slot_mapping=_reversed_slots(metadata.slot_mapping, block_size, top))
    backend = TorchBackend(device="cpu") if decodes == "reference" else TorchCPUBackend(device="cpu")
    if decodes == "native" and backend.native is None:
        pytest.skip("no C compiler here: the native kernels cannot be built")
    if decodes in ("padded", "in-place"):
        backend.native = None
    if decodes == "in-place":
        backend.PADDED_DECODE_BYTES_PER_SEQ = 0
    num_blocks = int(metadata.block_tables.max()) + 2
    cache = torch.zeros(backend.kv_cache_shape(num_blocks, block_size, kv_heads, dim))
    # Each sequence's full history, contiguous; its cached part goes into the
    # cache through the block table, as an earlier step would have written it.
    histories = [(torch.randn(s, kv_heads, dim, generator=generator),
                  torch.randn(s, kv_heads, dim, generator=generator)) for s in seq_lens]
    queries, new_keys, new_values = [], [], []
    for index, ((keys, values), q_len, s_len) in enumerate(zip(histories, query_lens, seq_lens)):
        cached = s_len - q_len
        if cached:
            table = metadata.block_tables[index]
            positions = torch.arange(cached)
            write_kv(cache, keys[:cached], values[:cached],
                     table[positions // block_size] * block_size + positions % block_size)
        queries.append(torch.randn(q_len, heads, dim, generator=generator))
        new_keys.append(keys[cached:])
        new_values.append(values[cached:])
    scale = dim ** -0.5
    out = backend.attention(torch.cat(queries), torch.cat(new_keys), torch.cat(new_values),
                            kv_cache=cache, metadata=metadata, scale=scale)
    expected = torch.cat([reference_attention(q, k, v, scale, window)
                          for q, (k, v) in zip(queries, histories)])
    return out, expected


def _reversed_slots(slots, block_size, top):
    return (top - slots // block_size) * block_size + slots % block_size


@pytest.mark.parametrize("query_lens,seq_lens", [
    ((7,), (7,)),                      # one prefill
    ((5, 1, 3), (5, 9, 12)),           # prefill, decode and a chunked prefill together
    ((1, 1, 1, 1), (1, 4, 5, 17)),     # decode-only: the padded batch path
    ((1, 4, 1, 2), (6, 4, 13, 9)),     # decodes batched beside prefill chunks
    ((1, 4, 5), (9, 13, 20)),          # speculative drafts verified beside a decode
    ((18, 3), (18, 25)),               # a chunk too long for the short-query paths beside a short one
])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("layout", ["views", "runs"])
@pytest.mark.parametrize("decodes", DECODE_PATHS)
def test_paged_attention_matches_contiguous(query_lens, seq_lens, heads, kv_heads, layout, decodes):
    out, expected = run_case(query_lens, seq_lens, heads=heads, kv_heads=kv_heads, layout=layout,
                             decodes=decodes)
    assert out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("query_lens,seq_lens", [((6, 1), (6, 11)), ((1, 1), (3, 10)), ((1,), (9,)),
                                                 ((1, 3, 1), (12, 3, 7)), ((1, 1), (17, 4))])
@pytest.mark.parametrize("layout", ["views", "runs"])
@pytest.mark.parametrize("decodes", DECODE_PATHS)
def test_sliding_window(query_lens, seq_lens, layout, decodes):
    out, expected = run_case(query_lens, seq_lens, window=4, layout=layout, decodes=decodes)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length,gathers", [(160, 1), (48, 0)])
def test_a_decode_over_too_many_runs_is_gathered(monkeypatch, length, gathers):
    # one run per block: 40 runs is over MAX_DECODE_RUNS, 12 is not
    assert TorchCPUBackend.MAX_DECODE_RUNS < 40
    calls = []
    gather = TorchCPUBackend._gather
    monkeypatch.setattr(TorchCPUBackend, "_gather", lambda self, *args: calls.append(1) or gather(self, *args))
    out, expected = run_case((1,), (length,), layout="runs", decodes="in-place")
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert len(calls) == gathers


def test_block_runs():
    assert block_runs([4, 5, 6, 9, 2, 3]) == ((4, 3), (9, 1), (2, 2))
    assert block_runs([7]) == ((7, 1),)
    assert block_runs([]) == ()
    assert block_runs([3, 2, 1]) == ((3, 1), (2, 1), (1, 1))


def test_new_keys_and_values_land_in_their_slots():
    metadata = AttentionMetadata.contiguous([3], [3], block_size=2)
    backend = TorchBackend(device="cpu")
    cache = torch.zeros(backend.kv_cache_shape(2, 2, 1, 1))
    key = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)
    backend.attention(torch.ones(3, 1, 1), key, -key, kv_cache=cache, metadata=metadata, scale=1.0)
    keys, values = gather_kv(cache, metadata.block_tables[0], 3)
    assert keys.flatten().tolist() == [1.0, 2.0, 3.0]
    assert values.flatten().tolist() == [-1.0, -2.0, -3.0]
    assert cache.sum().item() == 0.0  # nothing else was written


def test_prepare_moves_model_to_dtype_and_eval():
    model = torch.nn.Linear(2, 2).train()
    prepared = TorchBackend(device="cpu").prepare(model, dtype=torch.float64)
    assert prepared.weight.dtype == torch.float64 and not prepared.training


def test_satisfies_the_backend_protocol():
    assert isinstance(TorchBackend(), Backend) and isinstance(TorchCPUBackend(), Backend)


def test_cpu_backend_refuses_other_devices():
    from enigma.errors import BadRequestError

    with pytest.raises(BadRequestError, match="runs on the CPU, not on cuda; choose backend 'torch'"):
        TorchCPUBackend(device="cuda")


def test_kv_cache_memory_is_the_backends_to_size():
    from enigma.errors import BadRequestError

    backend = TorchBackend(device="cpu")
    assert backend.kv_cache_memory(12345) == 12345
    assert 0 < backend.kv_cache_memory(None) <= TorchBackend.DEFAULT_CPU_KV_CAP
    assert 0 < backend.kv_cache_memory(0.01) < backend.kv_cache_memory(0.02)
    with pytest.raises(BadRequestError, match="fraction of the device's free memory"):
        backend.kv_cache_memory(1.5)


def test_contiguous_metadata_rejects_queries_longer_than_sequences():
    with pytest.raises(ValueError, match="query_len <= seq_len"):
        AttentionMetadata.contiguous([4], [3], block_size=2)


@settings(max_examples=50, deadline=None)
@given(data=st.data(), block_size=st.sampled_from([1, 4, 16]))
def test_a_steps_inputs_are_each_tokens_id_position_and_slot(data, block_size):
    from types import SimpleNamespace

    from enigma.runner import ModelRunner, SequenceChunk

    chunks = []
    for _ in range(data.draw(st.integers(1, 5))):
        start = data.draw(st.integers(0, 40))
        tokens = data.draw(st.lists(st.integers(0, 999), min_size=1, max_size=20))
        blocks = -(-(start + len(tokens)) // block_size) + data.draw(st.integers(0, 2))
        table = data.draw(st.permutations(range(100)))[:blocks]
        chunks.append(SequenceChunk(tokens, start, table))
    runner = SimpleNamespace(block_size=block_size, device=torch.device("cpu"))
    ids, positions, metadata = ModelRunner.step_inputs(runner, chunks)
    expected = [(token, chunk.start + offset,
                 chunk.block_table[(chunk.start + offset) // block_size] * block_size
                 + (chunk.start + offset) % block_size)
                for chunk in chunks for offset, token in enumerate(chunk.token_ids)]
    assert list(zip(ids.tolist(), positions.tolist(), metadata.slot_mapping.tolist())) == expected
    width = max(len(chunk.block_table) for chunk in chunks)
    assert metadata.block_tables.tolist() == [list(c.block_table) + [0] * (width - len(c.block_table))
                                              for c in chunks]
    assert metadata.query_lens == tuple(len(c.token_ids) for c in chunks)
    assert metadata.seq_lens == tuple(c.start + len(c.token_ids) for c in chunks)
    assert ids.dtype == positions.dtype == metadata.slot_mapping.dtype == torch.long
