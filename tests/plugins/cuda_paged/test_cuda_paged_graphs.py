"""Decode steps run from static buffers padded to a bucket (replayed CUDA graphs on a GPU; on a CPU the same
buffers run eagerly): the same tokens as the reference, padding that touches no sequence's cache, graphs
dropped when the pool moves, and a setting that turns them off."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from enigma_cuda_paged.graphs import batch_buckets

from enigma import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tiny_models import make_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("graphs"), "llama-gqa", seed=7)


def prompts(count, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [[0, *torch.randint(7, 380, (3 + 5 * i,), generator=generator).tolist()] for i in range(count)]


def test_buckets():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(4) == (1, 2, 4)
    assert batch_buckets(20) == (1, 2, 4, 8, 16, 24)
    assert batch_buckets(256)[-1] == 256 and len(batch_buckets(256)) == 35


@pytest.mark.parametrize("count", [1, 3, 6])
def test_padded_decodes_give_the_reference_tokens(folder, device, count):
    params = [SamplingParams(temperature=0, max_tokens=4 + i, ignore_eos=True, logprobs=1) for i in range(count)]
    expected = LLM(folder, backend="torch", device="cpu", dtype="float32").generate(prompts(count), params)
    llm = LLM(folder, backend="cuda-paged", device=device, dtype="float32")
    got = llm.generate(prompts(count), params)
    graphs = llm.engine.runner.step_runner
    assert graphs.replays > 0                                          # the decodes ran from the buffers
    assert set(graphs.steps) <= {1, 2, 4, 8}
    for mine, theirs in zip(got, expected):
        assert mine.outputs[0].token_ids == theirs.outputs[0].token_ids
        for a, b, token in zip(mine.outputs[0].logprobs, theirs.outputs[0].logprobs, mine.outputs[0].token_ids):
            assert abs(a[token].logprob - b[token].logprob) < 1e-4
    assert llm.engine.cache.num_used_blocks == 0


def test_follow_on_decodes_feed_the_static_buffers_from_the_device(folder, device):
    # async scheduling: each decode's ids come from the previous step's draw, copied into the bucket's buffer
    params = [SamplingParams(temperature=0, max_tokens=5 + i, ignore_eos=True, logprobs=1) for i in range(3)]
    expected = LLM(folder, backend="torch", device="cpu", dtype="float32").generate(prompts(3), params)
    llm = LLM(folder, backend="cuda-paged", device=device, dtype="float32", async_scheduling=True)
    got = llm.generate(prompts(3), params)
    assert llm.engine.follow_on_steps > 0 and llm.engine.runner.step_runner.replays > 0
    for mine, theirs in zip(got, expected):
        assert mine.outputs[0].token_ids == theirs.outputs[0].token_ids
        for a, b, token in zip(mine.outputs[0].logprobs, theirs.outputs[0].logprobs, mine.outputs[0].token_ids):
            assert abs(a[token].logprob - b[token].logprob) < 1e-4
    assert llm.engine.cache.num_used_blocks == 0


def test_async_scheduling_is_the_gpus_default(folder, device, monkeypatch):
    llm = LLM(folder, backend="cuda-paged", device=device, dtype="float32")
    assert llm.engine.async_scheduling == (device == "cuda")
    monkeypatch.setenv("ENIGMA_PLUGINS__CUDA_PAGED__ASYNC_SCHEDULING", "false")
    assert not LLM(folder, backend="cuda-paged", device=device, dtype="float32").engine.async_scheduling


def test_padding_rows_write_only_the_spare_block(folder, device):
    llm = LLM(folder, backend="cuda-paged", device=device, dtype="float32", num_kv_blocks=40)
    runner = llm.engine.runner
    assert runner.kv_caches[0].shape[2] == 41                           # the pool's 40 and the spare
    llm.generate(prompts(3), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    before = [cache[:, :, :40].clone() for cache in runner.kv_caches]
    graphs = runner.step_runner
    step = graphs.steps[4]
    with torch.inference_mode():
        graphs._fill(step, [])                                           # every row a padding row
        graphs._forward(step) if step.graph is None else step.graph.replay()
    for cache, kept in zip(runner.kv_caches, before):
        assert torch.equal(cache[:, :, :40], kept)


def test_a_new_pool_drops_the_graphs(folder, device):
    llm = LLM(folder, backend="cuda-paged", device=device, dtype="float32")
    llm.generate(prompts(2), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    runner = llm.engine.runner
    assert runner.step_runner.steps
    runner.resize(runner.num_blocks)
    assert not runner.step_runner.steps


def test_graphs_can_be_turned_off(folder, device, monkeypatch):
    monkeypatch.setenv("ENIGMA_PLUGINS__CUDA_PAGED__CUDA_GRAPHS", "false")
    llm = LLM(folder, backend="cuda-paged", device=device, dtype="float32")
    assert llm.engine.runner.step_runner is None
    out = llm.generate(prompts(1), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


def test_prefills_drafts_prompt_logprobs_and_adapters_run_eagerly(folder, device):
    from enigma.runner import SequenceChunk

    llm = LLM(folder, backend="cuda-paged", device=device, dtype="float32")
    graphs = llm.engine.runner.step_runner
    llm.generate(prompts(2), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    assert graphs.replays == 0 and not graphs.steps                    # prefill only: nothing replayed
    decode = SequenceChunk([5], 7, [0])
    assert graphs.takes([decode, decode])
    for other in (SequenceChunk([5, 6], 7, [0]),                       # a draft being verified
                  SequenceChunk([5], 7, [0], all_logits=True),         # logprobs of every token
                  SequenceChunk([5], 7, [0], adapter="sql"),           # a LoRA adapter
                  SequenceChunk([5], 7, list(range(graphs.max_blocks + 1)))):  # a table past the static one
        assert not graphs.takes([decode, other])
    assert not graphs.takes([decode] * (graphs.buckets[-1] + 1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphs_are_captured_on_the_gpu(folder):
    llm = LLM(folder, backend="cuda-paged", dtype="float32")
    expected = LLM(folder, backend="cuda-paged", dtype="float32")
    with_graphs = llm.generate(prompts(5), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert all(step.graph is not None for step in llm.engine.runner.step_runner.steps.values())
    expected.engine.runner.step_runner = None
    eager = expected.generate(prompts(5), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in with_graphs] == [o.outputs[0].token_ids for o in eager]
