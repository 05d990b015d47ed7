"""The engine: batched equals solo, preemption, prefix sharing, no leaked blocks."""

from __future__ import annotations

import asyncio
import math
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enigma import LLM, BadRequestError, SamplingParams, hookimpl
from enigma.engine.async_engine import AsyncEngine
from enigma.engine.engine import Engine
from enigma.runner import ModelRunner


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tiny_models import make_model

    return make_model(tmp_path_factory.mktemp("engine"), "llama-gqa", seed=3)


def make_llm(folder, **options):
    return LLM(folder, block_size=4, **options)


def prompts_of(lengths, seed=0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [[0, *torch.randint(7, 380, (n - 1,), generator=generator).tolist()] for n in lengths]


PARAMS = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=1) for m in (9, 3, 14, 6, 11)]
LENGTHS = (5, 23, 2, 17, 40)


@pytest.fixture(scope="module")
def solo(folder):
    """Each request run alone: one sequence at a time, no chunking, no prefix cache."""
    llm = make_llm(folder, max_num_seqs=1, enable_prefix_caching=False, max_num_batched_tokens=512)
    return [llm.generate([p], params)[0].outputs[0] for p, params in zip(prompts_of(LENGTHS), PARAMS)]


def assert_same(outputs, solo):
    for got, expected in zip(outputs, solo):
        got = got.outputs[0]
        assert got.token_ids == expected.token_ids
        assert got.finish_reason == expected.finish_reason
        for mine, theirs, token in zip(got.logprobs, expected.logprobs, got.token_ids):
            assert math.isclose(mine[token].logprob, theirs[token].logprob, abs_tol=1e-4)


@pytest.mark.parametrize("budget", [512, 7], ids=["whole-prefills", "chunked-prefills"])
def test_mixed_batch_equals_each_request_alone(folder, solo, budget):
    llm = make_llm(folder, max_num_batched_tokens=budget)
    assert_same(llm.generate(prompts_of(LENGTHS), PARAMS), solo)
    assert llm.engine.cache.num_used_blocks == 0


def test_forced_preemption_gives_the_same_tokens(folder, solo):
    llm = make_llm(folder, num_kv_blocks=20, max_num_batched_tokens=64)  # 80 token slots for ~160 tokens
    outputs = llm.generate(prompts_of(LENGTHS), PARAMS)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_same(outputs, solo)
    assert llm.engine.cache.num_used_blocks == 0


def test_prefix_sharing_gives_the_same_tokens_and_hits(folder):
    system = prompts_of([33], seed=9)[0]
    prompts = [system + tail for tail in prompts_of([3, 6, 9, 4], seed=10)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = make_llm(folder, enable_prefix_caching=False, max_num_seqs=1)
    expected = [alone.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    llm = make_llm(folder)
    llm.generate([prompts[0]], params)  # warm the cache with the shared prefix
    outputs = llm.generate(prompts[1:], params)
    assert [o.outputs[0].token_ids for o in outputs] == expected[1:]
    stats = llm.engine.stats()
    assert stats["prefix_cache_hit_rate"] > 0.5
    assert stats["kv_blocks_used"] == 0 and stats["kv_blocks_cached"] > 0


def test_prompt_that_can_never_fit_is_rejected_at_once(folder):
    llm = make_llm(folder, num_kv_blocks=4)  # 16 token slots
    with pytest.raises(BadRequestError, match="the prompt has 20 tokens but what the KV cache can hold for one "
                                              "sequence is 16 tokens"):
        llm.generate([prompts_of([20])[0]])
    assert not llm.engine.has_unfinished()
    out = llm.generate([prompts_of([10])[0]], SamplingParams(max_tokens=50, ignore_eos=True))[0].outputs[0]
    assert (len(out.token_ids), out.finish_reason) == (6, "length")  # stops when the cache is full


def test_a_short_request_finishes_before_long_ones(folder):
    llm = make_llm(folder)
    engine = llm.engine
    long_ids = [engine.add_request(None, p, SamplingParams(max_tokens=60, ignore_eos=True))
                for p in prompts_of([30] * 15, seed=4)]
    for _ in range(5):
        engine.step()
    short = engine.add_request(None, prompts_of([16], seed=5)[0], SamplingParams(max_tokens=16, ignore_eos=True))
    finished_order = []
    while engine.has_unfinished():
        finished_order += [o.request_id for o in engine.step() if o.finished]
    assert finished_order.index(short) < min(finished_order.index(i) for i in long_ids)


def test_priority_is_honoured(folder):
    llm = make_llm(folder, max_num_seqs=1)
    engine = llm.engine
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    first = engine.add_request("low", prompts_of([5])[0], params, priority=5)
    urgent = engine.add_request("urgent", prompts_of([5])[0], params, priority=-1)
    order = []
    while engine.has_unfinished():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == [urgent, first]


def test_n_completions_and_lifecycle_events(folder, make_plugin_host):
    events = []
    plugin = types.ModuleType("watcher")
    plugin.enigma_request_started = hookimpl(lambda event: events.append(("started", event)))
    plugin.enigma_request_finished = hookimpl(lambda event: events.append(("finished", event)))
    plugin.enigma_engine_started = hookimpl(lambda engine: events.append(("engine", engine.model_name)))
    host = make_plugin_host(plugin)
    llm = make_llm(folder)
    engine = Engine(llm._runner, llm.tokenizer, model_name="tiny", num_blocks=64, host=host)
    engine.add_request("r", prompts_of([6])[0], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=4,
                                                              ignore_eos=True))
    final = None
    while engine.has_unfinished():
        for output in engine.step():
            final = output
    assert final.finished and [o.index for o in final.outputs] == [0, 1, 2]
    kinds = [kind for kind, _ in events]
    assert kinds == ["engine", "started", "finished"]
    finished = events[-1][1]
    assert (finished.request_id, finished.prompt_tokens, finished.generation_tokens) == ("r", 6, 12)
    assert finished.finish_reason == "length" and finished.time_to_first_token >= 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schedule=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 12), st.booleans(), st.integers(0, 6)),
                         min_size=1, max_size=8),
       blocks=st.integers(8, 40))
def test_every_block_returns_to_the_pool(folder_llm, schedule, blocks):
    """Random arrivals, lengths and aborts on a small cache: no block is ever leaked."""
    llm = folder_llm
    engine = Engine(llm._runner, llm.tokenizer, model_name="t", num_blocks=blocks, max_num_batched_tokens=16,
                    host=llm.engine._host)
    capacity = blocks * 4
    pending = list(enumerate(schedule))
    live: list[str] = []
    step = 0
    while pending or engine.has_unfinished():
        for index, (length, max_tokens, abort, at) in list(pending):
            if at <= step:
                pending.remove((index, (length, max_tokens, abort, at)))
                if length >= capacity:
                    with pytest.raises(BadRequestError):
                        engine.add_request(str(index), prompts_of([length], seed=index)[0])
                    continue
                engine.add_request(str(index), prompts_of([length], seed=index)[0],
                                   SamplingParams(max_tokens=max_tokens, ignore_eos=True, n=1 + index % 2))
                if abort:
                    live.append(str(index))
        if live and step % 3 == 2:
            engine.abort(live.pop())
        engine.step()
        step += 1
        assert step < 2000
    assert engine.cache.num_used_blocks == 0
    assert engine.cache.num_free_blocks == blocks


@pytest.fixture(scope="module")
def folder_llm(folder):
    return make_llm(folder)


def test_async_engine_streams_deltas_and_cancels(folder):
    llm = make_llm(folder)
    expected = llm.generate([prompts_of([7])[0]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    engine = Engine(llm._runner, llm.tokenizer, model_name="tiny", num_blocks=64, host=llm.engine._host)
    async_engine = AsyncEngine(engine)

    async def consume(prompt, max_tokens, stop_after=None):
        tokens, text, finished = [], "", None
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        async for delta in async_engine.generate(prompt, params):
            tokens += delta.outputs[0].token_ids
            text += delta.outputs[0].text
            finished = delta.outputs[0].finish_reason
            if stop_after is not None and len(tokens) >= stop_after:
                break  # a client going away
        return tokens, text, finished

    async def main():
        runs = [consume(prompts_of([7])[0], 12)] + [consume(p, 200, stop_after=3) for p in prompts_of([9] * 4)]
        return await asyncio.gather(*runs)

    results = asyncio.run(main())
    tokens, text, finished = results[0]
    assert tokens == expected[0].outputs[0].token_ids and text == expected[0].outputs[0].text
    assert finished == "length"
    assert all(3 <= len(r[0]) < 200 for r in results[1:])
    for _ in range(100):
        if not engine.has_unfinished():
            break
        asyncio.run(asyncio.sleep(0.02))
    assert engine.cache.num_used_blocks == 0  # cancelled streams freed their blocks
    async_engine.shutdown()
    assert not async_engine.is_running


def test_async_engine_reports_bad_input_per_request(folder):
    llm = make_llm(folder)
    async_engine = AsyncEngine(Engine(llm._runner, llm.tokenizer, model_name="t", num_blocks=64,
                                      host=llm.engine._host))

    async def main():
        with pytest.raises(BadRequestError, match="prompt token ids must be integers"):
            async for _ in async_engine.generate([10**6]):
                pass
        outputs = [o async for o in async_engine.generate(prompts_of([4])[0], SamplingParams(max_tokens=2))]
        return outputs

    assert asyncio.run(main())[-1].finished
    assert async_engine.is_running
    async_engine.shutdown()


def test_runner_pool_is_sized_by_memory_budget(folder):
    llm = make_llm(folder, kv_cache_memory=10_000)
    runner: ModelRunner = llm._runner
    assert llm.engine.cache.num_blocks == 10_000 // runner.bytes_per_block
    with pytest.raises(BadRequestError, match="less than one KV block"):
        make_llm(folder, kv_cache_memory=10)
    with pytest.raises(BadRequestError, match=r"kv_cache_memory=1.5 is invalid: give bytes .* fraction"):
        make_llm(folder, kv_cache_memory=1.5)
    fraction = make_llm(folder, kv_cache_memory=0.000001, max_num_seqs=1000)
    assert 0 < fraction.engine.cache.num_blocks < make_llm(folder, kv_cache_memory=0.00001,
                                                           max_num_seqs=1000).engine.cache.num_blocks


def test_contiguous_cache_baseline_reserves_whole_sequences(folder, solo):
    llm = make_llm(folder, cache="contiguous", num_kv_blocks=400)
    assert_same(llm.generate(prompts_of(LENGTHS), PARAMS), solo)
    engine = llm.engine
    # ignore_eos: a first token drawn as EOS (temperature 1) would end the request and free its blocks
    engine.add_request("x", prompts_of([5])[0], SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()
    assert engine.cache.num_used_blocks == engine.max_model_len // 4  # a full-length reservation


def test_a_requests_token_slice_spans_prompt_and_output_without_copying_both():
    from types import SimpleNamespace

    from enigma.engine.request import Request

    request = Request("r", "g", SimpleNamespace(prompt_token_ids=[10, 11, 12], output_token_ids=[20, 21]))
    everything = request.all_token_ids()
    for start in range(6):
        for end in range(start, 7):
            assert request.token_ids(start, end) == everything[start:end], (start, end)
