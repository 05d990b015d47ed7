"""The cuda-paged backend in the engine: the same greedy tokens and logprobs as the reference backend
(batches of prefills and decodes, chunked prefills, shared prefixes, sliding windows, verified drafts, any
block size, split keys), fp8 KV caches, its availability, its memory budget and what it refuses."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from enigma import LLM, BadRequestError, SamplingParams
from enigma.errors import ConfigError
from enigma.plugins import load_plugins

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tiny_models import make_model

PARAMS = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=1) for m in (9, 3, 14, 6)]
LENGTHS = (5, 23, 40, 17)


def prompts_of(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [[0, *torch.randint(7, 380, (n - 1,), generator=generator).tolist()] for n in lengths]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    made = {}

    def model(name):
        if name not in made:
            made[name] = make_model(tmp_path_factory.mktemp(name), name, seed=5)
        return made[name]

    return model


def generate(folder, backend, device, prompts=None, params=PARAMS, **options):
    llm = LLM(folder, backend=backend, device=device if backend == "cuda-paged" else "cpu", dtype="float32",
              **options)
    outputs = [output.outputs[0] for output in llm.generate(prompts or prompts_of(LENGTHS), params)]
    assert llm.engine.cache.num_used_blocks == 0
    return outputs


def assert_same(got, expected):
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.token_ids == theirs.token_ids
        for a, b, token in zip(mine.logprobs, theirs.logprobs, mine.token_ids):
            assert math.isclose(a[token].logprob, b[token].logprob, abs_tol=1e-4)


@pytest.mark.parametrize("name", ["llama-gqa", "mistral", "qwen2-window"])
@pytest.mark.parametrize("budget", [512, 7], ids=["whole-prefills", "chunked-prefills"])
def test_same_tokens_as_the_reference_backend(models, device, name, budget):
    folder = models(name)
    expected = generate(folder, "torch", device, max_num_batched_tokens=budget)
    assert_same(generate(folder, "cuda-paged", device, max_num_batched_tokens=budget), expected)


def test_shared_prefixes_read_from_the_same_blocks(models, device):
    shared = prompts_of([37])[0]
    prompts = [[*shared, 11, 12], [*shared, 13], [*shared, 14, 15, 16]]
    params = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=1)] * 3
    expected = generate(models("llama-gqa"), "torch", device, prompts, params, enable_prefix_caching=False)
    llm = LLM(models("llama-gqa"), backend="cuda-paged", device=device, dtype="float32")
    llm.generate([[*shared, 10]], params[0])  # leaves the prefix's blocks cached
    outputs = [output.outputs[0] for output in llm.generate(prompts, params)]
    assert llm.engine.stats()["prefix_cache_hit_rate"] > 0.5
    assert_same(outputs, expected)


@pytest.mark.parametrize("method", ["target-as-draft", "ngram"])
def test_verified_drafts_give_the_tokens_of_plain_decoding(models, device, method):
    # the target drafting for itself has every draft accepted; prompt lookup on random weights mostly not
    folder = models("llama-gqa")
    prompts = [[0, *([5, 6, 7, 8] * 6)], prompts_of([12])[0]]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * 2
    expected = generate(folder, "torch", device, prompts, params)
    config = {"model": str(folder)} if method == "target-as-draft" else {
        "method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    llm = LLM(folder, backend="cuda-paged", device=device, dtype="float32",
              speculative_config={**config, "num_speculative_tokens": 3, "adaptive": False})
    outputs = [output.outputs[0] for output in llm.generate(prompts, params)]
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
    stats = llm.engine.stats()
    assert stats["spec_decode_num_draft_tokens"] > 0
    if method == "target-as-draft":
        assert stats["spec_decode_num_accepted_tokens"] == stats["spec_decode_num_draft_tokens"]
    assert llm.engine.cache.num_used_blocks == 0


@pytest.mark.parametrize("block_size", [4, 24])
def test_any_block_size_gives_the_reference_tokens(models, device, block_size):
    # blocks smaller than a KV tile are gathered several to a tile; 24 is not a power of two
    folder = models("llama-gqa")
    expected = generate(folder, "torch", device, block_size=block_size)
    assert_same(generate(folder, "cuda-paged", device, block_size=block_size), expected)


def test_split_keys_give_the_reference_tokens(models, device, monkeypatch):
    # a GPU of 64 multiprocessors and splits of 16 keys: every decode here shares its keys out
    from enigma_cuda_paged import graphs, kernels

    monkeypatch.setattr(kernels, "multiprocessors", lambda device: 64)
    monkeypatch.setattr(graphs, "multiprocessors", lambda device: 64)
    monkeypatch.setattr(kernels, "MIN_SPLIT_KEYS", 16)
    folder = models("llama-gqa")
    expected = generate(folder, "torch", device)
    llm = LLM(folder, backend="cuda-paged", device=device, dtype="float32")
    outputs = [output.outputs[0] for output in llm.generate(prompts_of(LENGTHS), PARAMS)]
    assert_same(outputs, expected)
    assert all(step.tables.splits > 1 for step in llm.engine.runner.step_runner.steps.values())


@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2"])
def test_fp8_kv_caches_hold_more_tokens_and_give_the_reference_tokens(models, device, monkeypatch, name):
    # the oracle: the reference backend with its keys and values rounded through the same fp8 type
    from enigma.backends import torch_backend

    folder = models("llama-gqa")
    plain = LLM(folder, backend="cuda-paged", device=device, dtype="float32", kv_cache_memory=2**20)
    monkeypatch.setenv("ENIGMA_PLUGINS__CUDA_PAGED__KV_CACHE_DTYPE", name)
    llm = LLM(folder, backend="cuda-paged", device=device, dtype="float32", kv_cache_memory=2**20)
    runner = llm.engine.runner
    fp8 = torch.float8_e5m2 if name == "fp8_e5m2" else torch.float8_e4m3fn
    assert runner.kv_dtype == fp8 and runner.kv_caches[0].dtype == fp8
    assert runner.bytes_per_block * 4 == plain.engine.runner.bytes_per_block      # a quarter of float32's
    assert llm.engine.num_blocks >= 4 * plain.engine.num_blocks - 4
    write = torch_backend.write_kv
    monkeypatch.setattr(torch_backend, "write_kv", lambda cache, key, value, slots: write(
        cache, key.to(fp8).float(), value.to(fp8).float(), slots))
    expected = generate(folder, "torch", device)
    outputs = [output.outputs[0] for output in llm.generate(prompts_of(LENGTHS), PARAMS)]
    assert llm.engine.cache.num_used_blocks == 0
    assert_same(outputs, expected)


def test_e4m3_caches_are_refused_on_gpus_that_cannot_convert_them(monkeypatch):
    from enigma_cuda_paged.backend import fp8_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    with pytest.raises(BadRequestError, match="compute capability 8.9.*this one is 8.0.*fp8_e5m2"):
        fp8_dtype("fp8", torch.device("cuda"))
    assert fp8_dtype("fp8_e5m2", torch.device("cuda")) == torch.float8_e5m2
    assert fp8_dtype("auto", torch.device("cuda")) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    assert fp8_dtype("fp8_e4m3", torch.device("cuda")) == torch.float8_e4m3fn


def test_an_unknown_kv_cache_dtype_is_refused(models, device, monkeypatch):
    monkeypatch.setenv("ENIGMA_PLUGINS__CUDA_PAGED__KV_CACHE_DTYPE", "int4")
    with pytest.raises(ConfigError, match="kv_cache_dtype = .int4. .*auto, fp8, fp8_e4m3 or fp8_e5m2"):
        LLM(models("llama-gqa"), backend="cuda-paged", device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_a_gpu_it_says_why_and_auto_passes_it_by(monkeypatch):
    from enigma_cuda_paged.plugin import cuda_paged_availability

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    availability = cuda_paged_availability()
    assert not availability and "no CUDA device found" in availability.reason and "torch-cpu" in availability.reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    availability = cuda_paged_availability()
    assert availability and not availability.auto and "interpreter" in availability.reason
    assert load_plugins().registry.select("backend").name == "torch-cpu"


def test_cpu_device_without_the_interpreter_is_refused(monkeypatch):
    from enigma_cuda_paged.backend import CudaPagedBackend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BadRequestError, match="runs on a CUDA device, not on cpu.*torch-cpu"):
        CudaPagedBackend(device="cpu")


def test_explicit_kv_budgets_are_kept(device):
    from enigma_cuda_paged.backend import CudaPagedBackend

    backend = CudaPagedBackend(device=device)
    assert backend.kv_cache_memory(123456) == 123456
    with pytest.raises(BadRequestError, match="kv_cache_memory=1.5 is invalid"):
        backend.kv_cache_memory(1.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_default_pool_leaves_a_tenth_of_the_gpu():
    from enigma_cuda_paged.backend import CudaPagedBackend

    backend = CudaPagedBackend()
    free, total = torch.cuda.mem_get_info()
    budget = backend.kv_cache_memory(None)
    assert 0 < budget <= free and math.isclose(budget, 0.9 * total - (total - free), rel_tol=0.01)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bfloat16_on_the_gpu_follows_float32(models):
    # bf16 with random weights gives near-ties: compare the first steps' logprobs, not long greedy runs
    folder = models("llama-gqa")
    params = [SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, logprobs=1)] * 4
    full = LLM(folder, backend="cuda-paged", dtype="float32").generate(prompts_of(LENGTHS), params)
    half = LLM(folder, backend="cuda-paged", dtype="bfloat16").generate(prompts_of(LENGTHS), params)
    for a, b in zip(full, half):
        token = a.outputs[0].token_ids[0]
        if b.outputs[0].token_ids[0] == token:
            assert math.isclose(a.outputs[0].logprobs[0][token].logprob,
                                b.outputs[0].logprobs[0][token].logprob, abs_tol=0.1)
