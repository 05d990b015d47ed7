"""The torch-cpu backend's native decoder: a Llama's whole stack in one native call per step.

The torch path is the reference: the same steps through two runners of one
checkpoint, one with the native decoder switched off, give the same logits;
steps it does not take (grad, too many rows, long chunks, a model changed
after preparation) run the torch path."""

from __future__ import annotations

import ctypes

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from enigma import native
from enigma.backends.torch_cpu import TorchCPUBackend
from enigma.loader import load_model
from enigma.runner import ModelRunner, SequenceChunk

pytestmark = pytest.mark.skipif(native.kernels() is None, reason="no C compiler: the native kernels cannot be built")


def runners(folder, *, block_size: int = 4, num_blocks: int = 48) -> tuple[ModelRunner, ModelRunner]:
    """(native, torch): two runners of ``folder``; the second has the native decoder off."""
    fused = ModelRunner(load_model(folder), TorchCPUBackend(), block_size=block_size, num_blocks=num_blocks)
    plain = ModelRunner(load_model(folder), TorchCPUBackend(), block_size=block_size, num_blocks=num_blocks)
    assert fused.model.fused_layers is not None
    plain.model.fused_layers.enabled = False
    return fused, plain


def calls(runner: ModelRunner) -> list[int]:
    """Counts the native decoder's steps (rows per step)."""
    seen: list[int] = []
    decoder = runner.model.fused_layers.decoder
    original = decoder.__call__

    class Counting:
        def __getattr__(self, name):
            return getattr(decoder, name)

        def __call__(self, x, *args, **kwargs):
            seen.append(x.shape[0])
            return original(x, *args, **kwargs)

    runner.model.fused_layers.decoder = Counting()
    return seen


def same_steps(fused: ModelRunner, plain: ModelRunner, steps: list[list[SequenceChunk]], atol: float = 1e-4) -> None:
    """Equal logits, to ``atol`` times the logits' scale (float32 sums in another order: random weights of
    std 0.3 over three layers give logits around ten, where 1e-4 absolute is a few ulps)."""
    for chunks in steps:
        expected = plain.execute(chunks)
        got = fused.execute(chunks)
        scale = max(1.0, expected.last.abs().max().item())
        torch.testing.assert_close(got.last, expected.last, atol=atol * scale, rtol=0)
        for index, logits in expected.full.items():
            torch.testing.assert_close(got.full[index], logits, atol=atol * scale, rtol=0)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch", ["llama-gqa", "llama3-rope", "qwen2", "qwen2-window", "mistral"])
def test_decode_and_verify_steps_equal_the_torch_path(tiny_model, arch):
    fused, plain = runners(tiny_model(arch))
    seen = calls(fused)
    a, b = ids(40, 1), ids(9, 2)
    table_a, table_b = [11, 3, 20, 7, 1, 30, 31, 32, 33, 34, 35, 36], [5, 9, 2, 40, 41]
    steps = [
        [SequenceChunk(a[:20], 0, table_a)],                                  # 20 new tokens, short context
        [SequenceChunk(a[20:30], 20, table_a, all_logits=True), SequenceChunk(b[:6], 0, table_b)],  # short chunks
    ]
    steps += [[SequenceChunk([a[30 + i]], 30 + i, table_a), SequenceChunk([b[6 + i]], 6 + i, table_b)]
              for i in range(3)]                                              # decode-only, non-contiguous blocks
    steps.append([SequenceChunk(a[33:38], 33, table_a, all_logits=True)])    # a verify chunk of five
    same_steps(fused, plain, steps)
    assert seen == [20, 16, 2, 2, 2, 5]


def test_every_token_logits_for_the_chunks_that_ask_and_the_last_for_all(tiny_model):
    """The head runs once over the rows wanted: every token of chunks with ``all_logits`` (one token too),
    the last of the others; ``last`` holds each chunk's last row either way."""
    fused, plain = runners(tiny_model("llama-gqa"))
    a, b, c = ids(6, 21), ids(3, 22), ids(1, 23)
    chunks = [SequenceChunk(a, 0, [1, 2]), SequenceChunk(b, 0, [3], all_logits=True),
              SequenceChunk(c, 0, [4], all_logits=True)]
    got = fused.execute(chunks)
    assert sorted(got.full) == [1, 2] and got.full[1].shape[0] == 3 and got.full[2].shape[0] == 1
    for index in (1, 2):
        torch.testing.assert_close(got.last[index], got.full[index][-1])
    expected = plain.execute(chunks)
    torch.testing.assert_close(got.last, expected.last, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.full[1], expected.full[1], atol=1e-4, rtol=0)
    alone = fused.execute([SequenceChunk(c, 0, [5], all_logits=True)])  # one chunk of one token that asks
    assert list(alone.full) == [0] and alone.full[0].shape[0] == 1


@settings(max_examples=12, deadline=None)
@given(heads=st.sampled_from([(4, 4), (4, 2), (6, 1)]), head_dim=st.sampled_from([8, 12, 16, 32]),
       layers=st.integers(1, 3), rows=st.integers(1, 20), bias=st.booleans(), seed=st.integers(0, 1000))
def test_any_shape_equals_the_torch_path(tmp_path_factory, heads, head_dim, layers, rows, bias, seed):
    from enigma.models.llama import LlamaForCausalLM
    from enigma.training.sft import init_weights

    num_heads, kv_heads = heads
    config = {"architectures": ["Qwen2ForCausalLM" if bias else "LlamaForCausalLM"], "vocab_size": 97,
              "hidden_size": num_heads * head_dim, "intermediate_size": 3 * head_dim + 5, "num_hidden_layers": layers,
              "num_attention_heads": num_heads, "num_key_value_heads": kv_heads, "max_position_embeddings": 512,
              "rms_norm_eps": 1e-5, "head_dim": head_dim}
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_hf_config(config)
    init_weights(model, std=0.3)
    twin = LlamaForCausalLM.from_hf_config(config)
    twin.load_state_dict(model.state_dict())
    built = []
    for module in (model, twin):
        backend = TorchCPUBackend()
        built.append(ModelRunner(None, backend, block_size=8, num_blocks=128, dtype=torch.float32,
                                 prepared=backend.prepare(module, dtype=torch.float32)))
    built[1].model.fused_layers.enabled = False
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 39, (rows,), generator=generator).tolist()
    tables = [list(range(5 * r, 5 * r + 5)) for r in range(rows)]
    prompts = [torch.randint(0, 97, (n + 1,), generator=generator).tolist() for n in lengths]
    same_steps(*built, [[SequenceChunk(p[:-1], 0, t) for p, t in zip(prompts, tables)],
                        [SequenceChunk(p[-1:], n, t) for p, n, t in zip(prompts, lengths, tables)]])


def test_greedy_tokens_equal_with_batching_and_prefix_sharing(tiny_model):
    from enigma import LLM, SamplingParams

    folder = tiny_model("llama-gqa")
    prompts = [ids(12, 3), ids(12, 3)[:8] + ids(4, 4), ids(5, 5)]
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=1)
    fused = LLM(folder, block_size=4)
    plain = LLM(folder, block_size=4)
    plain.engine.runner.model.fused_layers.enabled = False
    for ours, theirs in zip(fused.generate(prompts, params), plain.generate(prompts, params)):
        assert ours.outputs[0].token_ids == theirs.outputs[0].token_ids
        for a, b in zip(ours.outputs[0].logprobs, theirs.outputs[0].logprobs):
            token = next(iter(b))
            assert abs(a[token].logprob - b[token].logprob) < 1e-4


def test_a_hook_added_after_preparation_is_honoured(tiny_model):
    fused, plain = runners(tiny_model("llama-gqa"))
    seen = calls(fused)
    a, table = ids(8, 6), [0, 1, 2, 3]
    same_steps(fused, plain, [[SequenceChunk(a[:6], 0, table)]])
    for runner in (fused, plain):  # what a tensor-parallel shard does: a forward hook on a block
        runner.model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: out * 0.5)
    same_steps(fused, plain, [[SequenceChunk([a[6]], 6, table)], [SequenceChunk([a[7]], 7, table)]])
    assert seen == [6] and not fused.model.fused_layers.enabled


def test_a_projection_replaced_after_preparation_is_honoured(tiny_model):
    fused, plain = runners(tiny_model("llama-gqa"))
    seen = calls(fused)

    class Scaled(torch.nn.Module):  # an adapter's wrapper, say
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 2

    for runner in (fused, plain):
        layer = runner.model.model.layers[1]
        layer.self_attn.o_proj = Scaled(layer.self_attn.o_proj)
    a = ids(4, 7)
    same_steps(fused, plain, [[SequenceChunk(a, 0, [0])]])
    assert seen == [] and not fused.model.fused_layers.enabled


def test_training_and_large_steps_take_the_torch_path(tiny_model):
    fused, _ = runners(tiny_model("llama-gqa"), num_blocks=64)
    seen = calls(fused)
    fused.execute([SequenceChunk(ids(3, 8), 0, [0])])
    fused.execute([SequenceChunk([5], 0, [1 + s]) for s in range(40)])             # 40 rows > 32
    assert seen == [3]
    # a chunk longer than the backend's short queries runs natively while tokens x context stay small
    fused.model.fused_layers.LONG_CHUNK_WORK = 17 * 20
    fused.execute([SequenceChunk(ids(17, 9), 0, [41, 42, 43, 44, 45])])             # 17 x 17: natively
    fused.execute([SequenceChunk(ids(17, 10), 3, [46, 47, 48, 49, 50])])            # 17 x 20: natively
    fused.execute([SequenceChunk(ids(17, 11), 4, [51, 52, 53, 54, 55, 56])])        # 17 x 21: torch
    fused.execute([SequenceChunk(ids(16, 12), 40, list(range(41, 56)))])             # 16: always natively
    assert seen == [3, 17, 17, 16]
    model = fused.model
    with torch.enable_grad():
        x = torch.tensor([5, 6])
        context = _context(fused, [SequenceChunk([5, 6], 0, [50])])
        hidden = model(x, torch.tensor([0, 1]), context)
    assert seen == [3, 17, 17, 16] and hidden.shape == (2, model.config.hidden_size)


def _context(runner: ModelRunner, chunks):
    from enigma.attention import ForwardContext

    return ForwardContext(backend=runner.backend, metadata=runner.metadata(chunks), kv_caches=runner.kv_caches)


@pytest.mark.parametrize("damage, message", [
    ("slot", "outside the KV pool"),
    ("table", "block table is shorter"),
    ("dtype", "float32 rows"),
    ("rows", "1..32"),
])
def test_bad_input_is_refused_with_a_reason(tiny_model, damage, message):
    fused, _ = runners(tiny_model("llama-gqa"), num_blocks=8)
    decoder = fused.model.fused_layers.decoder
    hidden = fused.model.config.hidden_size
    x = torch.randn(1, hidden)
    positions, slots = torch.tensor([0]), torch.tensor([0])
    tables, lengths = torch.tensor([[0]]), torch.tensor([1])
    if damage == "slot":
        slots = torch.tensor([8 * 4])
    elif damage == "table":
        lengths = torch.tensor([9])
    elif damage == "dtype":
        x = x.double()
    else:
        x = torch.randn(33, hidden)
    with pytest.raises(ValueError, match=message):
        decoder(x, positions, slots, fused.kv_caches, tables, lengths)


def test_a_self_draft_runs_the_first_layers_over_its_own_caches(tiny_model):
    """A speculative self-draft: the target's first layers, a runner with caches for those layers only."""
    fused, plain = runners(tiny_model("llama-gqa"))
    drafts = [ModelRunner(None, runner.backend, block_size=4, num_blocks=16, prepared=runner.model,
                          dtype=torch.float32) for runner in (fused, plain)]
    for draft in drafts:
        draft.kv_caches = draft.kv_caches[:1]
    first_layer = [SelfDraft(runner.model) for runner in drafts]
    for draft, model in zip(drafts, first_layer):
        draft.model = model
    seen = calls(fused)
    a = ids(6, 9)
    same_steps(drafts[0], drafts[1], [[SequenceChunk(a[:5], 0, [0, 1])], [SequenceChunk([a[5]], 5, [0, 1])]])
    assert seen == [5, 1]


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2"])
def test_greedy_decoding_in_one_go_equals_a_step_at_a_time(tiny_model, arch):
    """``decode_greedy``: the native decoder's steps back to back give the tokens and KV of the torch path's
    steps one execute at a time (sequences of different lengths, one stopping early)."""
    fused, plain = runners(tiny_model(arch))
    seen = calls(fused)
    counting, in_one_call = fused.model.fused_layers.decoder, []
    native_loop = counting.decode_greedy
    counting.decode_greedy = lambda *args, **kwargs: in_one_call.append(args[-1]) or native_loop(*args, **kwargs)
    a, b = ids(7, 3), ids(3, 4)
    tables = [[11, 3, 20, 7], [5, 9, 2, 40]]
    for runner in (fused, plain):
        runner.execute([SequenceChunk(a[:4], 0, tables[0]), SequenceChunk(b[:2], 0, tables[1])])
    args = ([a[4:7], [b[2]]], [4, 2], tables, [5, 2])  # a first feed of three tokens, then one a step
    got, expected = fused.decode_greedy(*args), plain.decode_greedy(*args)
    assert got == expected and [len(tokens) for tokens in got] == [5, 2]
    # the first feeds (4 rows), a step while the two need different numbers of steps, then the last three
    # steps of the first sequence in one native call; none through the runner's execute
    assert seen[-2:] == [4, 2] and in_one_call == [3]
    for mine, theirs in zip(fused.kv_caches, plain.kv_caches):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
    # the self-draft's view runs its first layers only, over its own caches
    views = [ModelRunner(None, runner.backend, block_size=4, num_blocks=48, prepared=first_layer_of(runner.model),
                         dtype=torch.float32) for runner in (fused, plain)]
    for view in views:
        view.execute([SequenceChunk(a[:6], 0, tables[0])])
    # a feed longer than the native decoder takes in one step runs the torch path, with the same tokens
    long = ids(40, 5)
    greedy = [runner.decode_greedy([long], [0], [list(range(first, first + 12))], [3])
              for runner, first in ((fused, 10), (plain, 22))]
    assert greedy[0] == greedy[1]
    greedy = [view.decode_greedy([[a[6]]], [6], tables[:1], [3]) for view in views]
    assert greedy[0] == greedy[1]


def test_native_greedy_loop_reads_bfloat16_embeddings_and_refuses_bad_tokens(tiny_model):
    fused, _ = runners(tiny_model("llama-gqa"))
    model = fused.model
    decoder, head = model.fused_layers.decoder, model.fused_layers._head(model.lm_head)
    a, table = ids(6, 12), torch.tensor([[3, 4, 5, 6]])
    fused.execute([SequenceChunk(a[:5], 0, [3, 4, 5, 6])])
    narrow = model.model.embed_tokens.weight.detach().to(torch.bfloat16)
    args = ([a[5]], [5], table, fused.kv_caches, 4)
    # the same numbers, widened in the loop or before it: the same tokens
    assert decoder.decode_greedy(narrow, head, *args) == decoder.decode_greedy(narrow.float(), head, *args)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        decoder.decode_greedy(narrow, head, [10**6], [5], table, fused.kv_caches, 2)
    with pytest.raises(ValueError, match="block table is shorter"):
        decoder.decode_greedy(narrow, head, [a[5]], [5], table, fused.kv_caches, 40)


def first_layer_of(model):
    from enigma.speculative.draft_model import LeadingLayers

    return LeadingLayers(model, 1)


class SelfDraft(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.target = model
        self.config = model.config

    def forward(self, input_ids, positions, context):
        return self.target(input_ids, positions, context, num_layers=1)

    def compute_logits(self, hidden):
        return self.target.compute_logits(hidden)


@pytest.mark.parametrize("width", [300, 301, 2048])   # even widths read the weights in pairs, odd ones singly
def test_bfloat16_matmul_equals_the_float32_matmul_of_its_widened_weights(width):
    kernels = native.kernels()
    function = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_int)(kernels.bf16_matmul)
    generator = torch.Generator().manual_seed(width)
    weight = torch.randn(61, width, generator=generator).to(torch.bfloat16)  # blocks of 24 rows, of 4, single ones
    bias = torch.randn(61, generator=generator)
    # float32 sums of `width` products of unit-variance numbers: rounding grows with the width (the reference
    # sums in another order)
    atol = max(1e-4, 2.5e-7 * width)
    for rows in (1, 2, 5, 9, 17, 33):  # dot products, then groups of 8 and 16 rows (widened a block at a time)
        x = torch.randn(rows, width, generator=generator)
        y = torch.empty(rows, 61)
        assert function(0, weight.data_ptr(), 61, width, x.data_ptr(), rows, None, y.data_ptr(), 2) == 0
        reference = (x.double() @ weight.double().T).float()
        torch.testing.assert_close(y, reference, rtol=1e-5, atol=atol)
        torch.testing.assert_close(kernels.linear(x, weight, bias), reference + bias, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2"])
def test_bfloat16_models_decode_natively_at_least_as_close_to_float32_as_torch(tiny_model, arch):
    # The native decoder keeps a bfloat16 model's activations in float32 where torch rounds them after every
    # operation: against the same weights in float32, its decode steps are at least as close as torch's.
    folder = tiny_model(arch, dtype="bfloat16")
    native_bf16 = ModelRunner(load_model(folder), TorchCPUBackend(), block_size=4, num_blocks=48)
    torch_bf16 = ModelRunner(load_model(folder), TorchCPUBackend(), block_size=4, num_blocks=48)
    reference = ModelRunner(load_model(folder, dtype="float32"), TorchCPUBackend(), block_size=4, num_blocks=48)
    assert native_bf16.dtype == torch.bfloat16 and native_bf16.kv_caches[0].dtype == torch.bfloat16
    assert native_bf16.model.fused_layers is not None
    torch_bf16.model.fused_layers.enabled = False
    reference.model.fused_layers.enabled = False
    seen = calls(native_bf16)
    a, b = ids(30, 7), ids(11, 8)
    table_a, table_b = [11, 3, 20, 7, 1, 30, 31, 32, 33, 34], [5, 9, 2, 40, 41]
    steps = [[SequenceChunk(a[:24], 0, table_a), SequenceChunk(b[:6], 0, table_b)]]
    steps += [[SequenceChunk([a[24 + i]], 24 + i, table_a), SequenceChunk([b[6 + i]], 6 + i, table_b)]
              for i in range(4)]
    steps.append([SequenceChunk(a[28:30], 28, table_a, all_logits=True)])   # a short verify chunk
    worst_native = worst_torch = 0.0
    for chunks in steps:
        expected = reference.execute(chunks).last
        got, theirs = native_bf16.execute(chunks).last, torch_bf16.execute(chunks).last
        worst_native = max(worst_native, (got - expected).abs().max().item())
        worst_torch = max(worst_torch, (theirs - expected).abs().max().item())
    assert seen == [30, 2, 2, 2, 2, 2]                   # the short prompts, decodes and verify chunk natively
    scale = reference.execute(steps[-1]).last.abs().max().item()
    assert worst_native <= max(worst_torch, 0.02 * scale)
    assert worst_native < 0.05 * scale


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verify_chunks_over_blocks_of_16_equal_the_torch_path(tiny_model, dtype):
    """Blocks of 16 (the engine's default): a verify chunk's rows are attended as one run."""
    folder = tiny_model("llama-gqa", dtype=dtype)
    fused, plain = (ModelRunner(load_model(folder), TorchCPUBackend(), block_size=16, num_blocks=16)
                    for _ in range(2))
    plain.model.fused_layers.enabled = False
    seen = calls(fused)
    a, table = ids(50, 11), [7, 2, 9, 4]
    steps = [[SequenceChunk(a[:37], 0, table)], [SequenceChunk(a[37:46], 37, table, all_logits=True)],
             [SequenceChunk([a[46]], 46, table)]]
    for chunks in steps:
        expected, got = plain.execute(chunks), fused.execute(chunks)
        scale = max(1.0, expected.last.abs().max().item())
        tolerance = 1e-4 if dtype == "float32" else 0.05
        torch.testing.assert_close(got.full.get(0, got.last), expected.full.get(0, expected.last),
                                   atol=tolerance * scale, rtol=0)
    assert seen == [9, 1]


def test_bfloat16_greedy_tokens_follow_the_float32_model(tiny_model):
    from enigma import LLM, SamplingParams

    folder = tiny_model("llama-gqa", dtype="bfloat16")
    prompts = [ids(12, 3), ids(5, 5)]
    params = SamplingParams(temperature=0, max_tokens=16)
    bf16 = LLM(folder, block_size=4)
    assert bf16.engine.runner.dtype == torch.bfloat16 and bf16.engine.runner.model.fused_layers is not None
    full = LLM(folder, block_size=4, dtype="float32")
    for ours, theirs in zip(bf16.generate(prompts, params), full.generate(prompts, params)):
        assert ours.outputs[0].token_ids == theirs.outputs[0].token_ids
