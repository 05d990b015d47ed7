"""Tensor parallelism (`LLM(tensor_parallel_size=2)`, `enigma serve --tensor-parallel 2`): a driver and a
worker process over gloo give what one process gives, and a dead worker stops the engine loudly."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from serving import launch, stop
from tiny_models import make_model

from enigma import LLM, SamplingParams
from enigma.errors import ConfigError

PARAMS = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=2) for m in (9, 3, 14, 6, 11)]
LENGTHS = (5, 23, 2, 17, 40)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("tp-llama"), "llama-gqa", seed=3)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """q/k/v biases, tied embeddings, and a vocabulary two ranks cannot split evenly (385 rows)."""
    return make_model(tmp_path_factory.mktemp("tp-qwen2"), "qwen2", seed=4, vocab_size=385)


def prompts_of(lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [[0, *torch.randint(7, 380, (n - 1,), generator=generator).tolist()] for n in lengths]


def assert_same(outputs, expected) -> None:
    for got, want in zip(outputs, expected):
        got, want = got.outputs[0], want.outputs[0]
        assert got.token_ids == want.token_ids
        for mine, theirs in zip(got.logprobs, want.logprobs):
            assert mine.keys() == theirs.keys()
            for token in mine:
                assert math.isclose(mine[token].logprob, theirs[token].logprob, abs_tol=1e-4)


def workers_of(pid: int) -> list:
    import psutil

    return [child for child in psutil.Process(pid).children(recursive=True)
            if "enigma_zero.executor" in " ".join(child.cmdline())]


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_two_ranks_give_one_process_tokens_and_logprobs(request, model):
    folder = request.getfixturevalue(model)
    prompts = prompts_of(LENGTHS)
    expected = LLM(folder, block_size=4).generate(prompts, PARAMS)
    with LLM(folder, block_size=4, tensor_parallel_size=2, max_num_batched_tokens=7) as parallel:
        assert len(workers_of(os.getpid())) == 1
        assert_same(parallel.generate(prompts, PARAMS), expected)
        assert parallel.engine.cache.num_used_blocks == 0
    assert workers_of(os.getpid()) == []  # close() stopped the worker


def test_preemption_and_prefix_caching_stay_exact(llama):
    prompts = prompts_of(LENGTHS)
    expected = LLM(llama, block_size=4, max_num_seqs=1, enable_prefix_caching=False).generate(prompts, PARAMS)
    system = prompts_of((33,), seed=9)[0]
    shared = [system + tail for tail in prompts_of((3, 6, 9, 4), seed=10)]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = LLM(llama, block_size=4, enable_prefix_caching=False, max_num_seqs=1)
    shared_expected = [alone.generate([p], greedy)[0].outputs[0].token_ids for p in shared]

    with LLM(llama, block_size=4, num_kv_blocks=20, max_num_batched_tokens=64, tensor_parallel_size=2) as tight:
        assert_same(tight.generate(prompts, PARAMS), expected)
        assert tight.engine.scheduler.num_preemptions > 0
        assert tight.engine.cache.num_used_blocks == 0
    with LLM(llama, block_size=4, tensor_parallel_size=2) as cached:
        cached.generate([shared[0]], greedy)
        outputs = cached.generate(shared[1:], greedy)
        assert [o.outputs[0].token_ids for o in outputs] == shared_expected[1:]
        assert cached.engine.stats()["prefix_cache_hit_rate"] > 0.5


@pytest.mark.parametrize("size", [3, 4])
def test_a_size_that_does_not_divide_the_heads_is_refused_by_both_numbers(llama, size):
    with pytest.raises(ConfigError, match=f"tensor_parallel_size {size} must divide the model's 4 attention "
                                          "heads and 2 KV heads"):
        LLM(llama, tensor_parallel_size=size)
    assert workers_of(os.getpid()) == []


def test_speculation_with_tensor_parallelism_is_refused(llama):
    with pytest.raises(ConfigError, match="speculative decoding does not run under tensor parallelism"):
        LLM(llama, tensor_parallel_size=2, speculative_model="[ngram]")


def test_a_killed_worker_fails_requests_and_the_server_says_unhealthy(llama, tmp_path):
    from openai import OpenAI

    env = {**os.environ, "ENIGMA_HOME": str(tmp_path / "home")}
    server, base = launch(env, str(llama), "--tensor-parallel", "2", "--no-auth", log_path=tmp_path / "serve.log")
    try:
        client = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)
        first = client.completions.create(model=str(llama), prompt="hello", max_tokens=4, temperature=0)
        assert first.choices[0].text is not None
        (worker,) = workers_of(server.pid)
        worker.send_signal(signal.SIGKILL)
        while worker.is_running() and worker.status() != "zombie":  # dead; the server reaps it
            time.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(Exception) as failure:
            client.completions.create(model=str(llama), prompt="hello again", max_tokens=4, temperature=0)
        assert time.monotonic() - started < 30
        assert "worker rank 1 of 2 was killed by SIGKILL" in str(failure.value)
        health = httpx.get(f"{base}/health", timeout=10)
        assert health.status_code == 503
    finally:
        stop(server)
    assert "worker rank 1 of 2 was killed by SIGKILL" in (tmp_path / "serve.log").read_text()
