"""Async scheduling: a step of plain decodes queues the next decode of its requests, fed from its draw on the
device, before taking its tokens in. On a CPU nothing overlaps, but the engine runs the same path when asked
(``async_scheduling=True``), so these tests check that it changes no output and loses no block: the same tokens,
logprobs and finish reasons as stepping one step at a time, across finishes, arrivals, aborts and the requests
it must leave to the scheduler."""

from __future__ import annotations

import pytest
import torch

from enigma import LLM, SamplingParams


def prompts(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [[0, *torch.randint(7, 380, (3 + 4 * i,), generator=generator).tolist()] for i in range(count)]


@pytest.fixture(scope="module")
def folder(tiny_model):
    return tiny_model("llama-gqa")


def run(folder, params, *, async_scheduling, count=5, **options):
    llm = LLM(folder, dtype="float32", async_scheduling=async_scheduling, **options)
    outputs = llm.generate(prompts(count), params)
    assert llm.engine.cache.num_used_blocks == 0
    return llm, outputs


def same(got, expected):
    for mine, theirs in zip(got, expected, strict=True):
        for a, b in zip(mine.outputs, theirs.outputs, strict=True):
            assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
            if b.logprobs is not None:
                assert [{k: round(v.logprob, 4) for k, v in step.items()} for step in a.logprobs] == \
                       [{k: round(v.logprob, 4) for k, v in step.items()} for step in b.logprobs]


PARAMS = {
    "greedy, lengths and logprobs": [SamplingParams(temperature=0, max_tokens=4 + 3 * i, ignore_eos=True,
                                                    logprobs=2) for i in range(5)],
    "seeded sampling, n=2": [SamplingParams(temperature=0.9, top_p=0.9, seed=i, n=2, max_tokens=9, ignore_eos=True)
                             for i in range(5)],
    "stop strings and EOS": [SamplingParams(temperature=1.0, seed=i, max_tokens=30, stop=["e"]) for i in range(5)],
}


@pytest.mark.parametrize("case", PARAMS)
def test_follow_on_steps_change_nothing(folder, case):
    llm, got = run(folder, PARAMS[case], async_scheduling=True)
    _, expected = run(folder, PARAMS[case], async_scheduling=False)
    same(got, expected)
    assert llm.engine.follow_on_steps > 0


def test_the_scheduler_chooses_where_follow_ons_cannot_run(folder):
    # penalties read the tokens the host does not have yet, and so does min_tokens until it is met (here: to
    # the end); drafts need verifying
    for params in (SamplingParams(temperature=0, max_tokens=6, repetition_penalty=1.3, ignore_eos=True),
                   SamplingParams(temperature=0, max_tokens=6, min_tokens=6)):
        llm, got = run(folder, params, async_scheduling=True)
        _, expected = run(folder, params, async_scheduling=False)
        same(got, expected)
        assert llm.engine.follow_on_steps == 0
    llm = LLM(folder, dtype="float32", async_scheduling=True,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    llm.generate(prompts(2), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert llm.engine.follow_on_steps == 0


def test_requests_that_wait_for_room_stop_the_follow_ons(folder):
    # two sequences at a time: while others wait every step is the scheduler's; only the last request, alone,
    # runs on follow-ons (its 7 decodes after the prefill)
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * 5
    llm, got = run(folder, params, async_scheduling=True, max_num_seqs=2)
    _, expected = run(folder, params, async_scheduling=False, max_num_seqs=2)
    same(got, expected)
    assert 0 < llm.engine.follow_on_steps <= 7


def test_arrivals_and_aborts_between_steps(folder):
    def drive(async_scheduling):
        llm = LLM(folder, dtype="float32", async_scheduling=async_scheduling)
        engine = llm.engine
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        engine.add_request("a", prompts(3)[0], params)
        engine.add_request("b", prompts(3)[1], params)
        finished = {}
        for step in range(40):
            if step == 3:
                engine.add_request("c", prompts(3)[2], params)   # arrives while a follow-on may be in flight
            if step == 6:
                engine.abort("b")
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output.outputs[0].token_ids
            if not engine.has_unfinished():
                break
        engine.step()                                            # takes in a follow-on left in flight, if any
        assert engine.cache.num_used_blocks == 0 and not engine.has_unfinished()
        return finished, engine.follow_on_steps

    got, follow_ons = drive(True)
    expected, _ = drive(False)
    assert got == expected and set(got) == {"a", "c"} and follow_ons > 0


def test_requests_running_to_the_end_of_the_context(folder):
    # a pool of 12 blocks of 16 (192 tokens) that both cannot hold to the end: they run until the context is
    # full, one preempted for the other on the way (no room for a follow-on: the scheduler chooses)
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True, logprobs=0)
    llm = LLM(folder, dtype="float32", async_scheduling=True, num_kv_blocks=12)
    got = llm.generate(prompts(2), params)
    expected = LLM(folder, dtype="float32", async_scheduling=False, num_kv_blocks=12).generate(prompts(2), params)
    same(got, expected)
    assert all(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) == llm.engine.max_model_len for o in got)
    assert llm.engine.follow_on_steps > 0 and llm.engine.cache.num_used_blocks == 0
