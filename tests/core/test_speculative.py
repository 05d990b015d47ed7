"""Speculative decoding: greedy identity, the target's distribution kept, KV rolled back, adaptive k."""

from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enigma import LLM, BadRequestError, SamplingParams
from enigma.engine.engine import Engine
from enigma.errors import PluginError
from enigma.speculative import SpeculativeConfig
from enigma.speculative.length import SpeculationLength, best_length, expected_tokens
from enigma.speculative.ngram import lookup_ngram
from enigma.speculative.rejection import verify_drafts

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from tiny_models import make_model

    return make_model(tmp_path_factory.mktemp("spec-target"), "llama-gqa", seed=3, layers=3)


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    from tiny_models import make_model

    return make_model(tmp_path_factory.mktemp("spec-draft"), "llama-gqa", seed=11, layers=1, hidden_size=32)


def prompts_of(lengths, seed=0, repeat=False):
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for n in lengths:
        tokens = torch.randint(7, 380, (max(1, n // 3 if repeat else n - 1),), generator=generator).tolist()
        prompts.append([0, *(tokens * 3)[: n - 1]] if repeat else [0, *tokens])
    return prompts


PARAMS = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=1) for m in (9, 3, 14, 6, 11, 20)]
LENGTHS = (5, 23, 2, 17, 40, 30)
METHODS = {
    "draft": lambda draft: {"model": str(draft)},
    "ngram": lambda draft: {"method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 3},
    "self": lambda draft: {"method": "self", "draft_layers": 1},
    "target-as-draft": None,  # the target drafts for itself: every draft must be accepted
}


def spec_config(method, target, draft, **extra):
    fields = {"model": str(target)} if method == "target-as-draft" else METHODS[method](draft)
    return {**fields, "num_speculative_tokens": 3, "adaptive": False, **extra}


@pytest.fixture(scope="module")
def plain(target):
    llm = LLM(target, block_size=4)
    prompts = prompts_of(LENGTHS, repeat=True)
    return [o.outputs[0] for o in llm.generate(prompts, PARAMS)]


def assert_same(outputs, expected):
    for got, want in zip(outputs, expected):
        got = got.outputs[0]
        assert got.token_ids == want.token_ids
        assert got.finish_reason == want.finish_reason
        for mine, theirs, token in zip(got.logprobs, want.logprobs, got.token_ids):
            assert mine[token].logprob == pytest.approx(theirs[token].logprob, abs=1e-4)


# ---------------------------------------------------------------- greedy identity


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("budget", [512, 7], ids=["whole-prefills", "chunked-prefills"])
def test_greedy_tokens_equal_plain_decoding(target, draft, plain, method, budget):
    llm = LLM(target, block_size=4, max_num_batched_tokens=budget,
              speculative_config=spec_config(method, target, draft))
    outputs = llm.generate(prompts_of(LENGTHS, repeat=True), PARAMS)
    assert_same(outputs, plain)
    stats = llm.engine.stats()
    assert stats["spec_decode_num_draft_tokens"] > 0
    if method == "target-as-draft":
        assert stats["spec_decode_draft_acceptance_rate"] == 1.0
    assert llm.engine.cache.num_used_blocks == 0


@pytest.mark.parametrize("method", ["draft", "target-as-draft"])
def test_greedy_identity_with_penalties_and_min_tokens(target, draft, method):
    """Greedy requests whose logits a penalty or min_tokens changes verify against the processed logits; the
    others against the raw argmax (one batch holds both)."""
    penalised = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.3,
                               frequency_penalty=0.5)  # with these prompts: other tokens than without
    params = [penalised, SamplingParams(temperature=0, max_tokens=10, min_tokens=8),
              SamplingParams(temperature=0, max_tokens=10), penalised]
    prompts = prompts_of((12, 20, 9, 30), seed=0, repeat=True)
    expected = LLM(target, block_size=4).generate(prompts, params)
    llm = LLM(target, block_size=4, speculative_config=spec_config(method, target, draft))
    got = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert llm.engine.stats()["spec_decode_num_draft_tokens"] > 0


@pytest.mark.parametrize("method", ["draft", "ngram", "target-as-draft"])
def test_greedy_identity_survives_preemption(target, draft, plain, method):
    llm = LLM(target, block_size=4, num_kv_blocks=24, max_num_batched_tokens=64,
              speculative_config=spec_config(method, target, draft))
    outputs = llm.generate(prompts_of(LENGTHS, repeat=True), PARAMS)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_same(outputs, plain)
    assert llm.engine.cache.num_used_blocks == 0


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_prefix_cache_hashes_cover_only_accepted_tokens(target, draft, method):
    """Blocks committed while drafts were rolled back are reused by a later prompt that extends an
    earlier answer: its tokens must be those of a fresh engine without any cache."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    shared = prompts_of([26], seed=4, repeat=True)[0]
    llm = LLM(target, block_size=4, speculative_config=spec_config(method, target, draft))
    first = llm.generate([shared], params)[0].outputs[0].token_ids
    follow_up = shared + first + [42, 43]
    got = llm.generate([follow_up], params)[0]
    fresh = LLM(target, block_size=4, enable_prefix_caching=False).generate([follow_up], params)[0]
    assert llm.engine.cache.stats()["prefix_cache_hit_rate"] > 0
    assert got.outputs[0].token_ids == fresh.outputs[0].token_ids


def test_constrained_and_sampled_requests_share_a_batch(target, draft, plain):
    llm = LLM(target, block_size=4, speculative_config=spec_config("target-as-draft", target, draft))
    prompts = prompts_of(LENGTHS, repeat=True)
    choice = SamplingParams(max_tokens=10, guided_decoding={"choice": ["yes", "no"]})
    sampled = SamplingParams(max_tokens=12, temperature=0.9, seed=5, ignore_eos=True)
    outputs = llm.generate([*prompts, prompts[0], prompts[1]], [*PARAMS, choice, sampled])
    assert_same(outputs[:len(PARAMS)], plain)
    assert outputs[-2].outputs[0].text in ("yes", "no")
    assert len(outputs[-1].outputs[0].token_ids) == 12


# ---------------------------------------------------------------- the distribution


def test_rejection_sampling_keeps_the_target_distribution():
    """One position, a draft distribution unlike the target's: the emitted token is distributed as p."""
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0])
    q = torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3])
    counts = collections.Counter()
    for _ in range(20000):
        draft = int(torch.multinomial(q, 1, generator=generator))
        emitted = verify_drafts(torch.stack([p, p]), [draft], q[None], generator=generator)
        counts[emitted[0]] += 1
    observed = [counts[i] for i in range(4)]
    assert counts[4] == 0
    assert scipy_stats.chisquare(observed, [20000 * float(x) for x in p[:4]]).pvalue > 1e-3


def test_point_mass_drafts_keep_the_target_distribution():
    generator = torch.Generator().manual_seed(1)
    p = torch.tensor([0.1, 0.6, 0.3])
    counts = collections.Counter(verify_drafts(torch.stack([p, p]), [2], None, generator=generator)[0]
                                 for _ in range(20000))
    assert scipy_stats.chisquare([counts[i] for i in range(3)], [2000, 12000, 6000]).pvalue > 1e-3


def test_greedy_verification_keeps_drafts_while_they_equal_the_argmax():
    rows = torch.eye(5)[[2, 3, 1, 4]]  # argmaxes 2, 3, 1, 4
    assert verify_drafts(rows, [2, 3, 0], None, greedy=True) == [2, 3, 1]
    assert verify_drafts(rows, [2, 3, 1], None, greedy=True) == [2, 3, 1, 4]
    assert verify_drafts(rows, [0, 3, 1], None, greedy=True) == [2]


def sample_marginals(llm, prompt, *, samples, positions=3):
    params = [SamplingParams(temperature=1.0, top_k=4, max_tokens=positions, ignore_eos=True, seed=seed)
              for seed in range(samples)]
    outputs = llm.generate([prompt] * samples, params)
    return [tuple(o.outputs[0].token_ids) for o in outputs]


def contingency_pvalue(first, second, position):
    a = collections.Counter(seq[position] for seq in first)
    b = collections.Counter(seq[position] for seq in second)
    keys = sorted(set(a) | set(b))
    return scipy_stats.chi2_contingency([[a[k] for k in keys], [b[k] for k in keys]]).pvalue


@pytest.mark.slow
def test_sampled_outputs_have_the_same_distribution_with_and_without_speculation(target, draft):
    """Chi-square on the tokens at each position (top-k 4: a small vocabulary), 1500 seeded samples each;
    the draft model's own samples differ from the target's, so the test can tell them apart."""
    prompt = prompts_of([12], seed=8, repeat=True)[0]
    plain = sample_marginals(LLM(target, block_size=4), prompt, samples=1500)
    speculative = LLM(target, block_size=4, speculative_config=spec_config("draft", target, draft))
    drafted = sample_marginals(speculative, prompt, samples=1500)
    stats = speculative.engine.stats()
    assert 0.05 < stats["spec_decode_draft_acceptance_rate"] < 0.95  # both outcomes were exercised
    for position in range(3):
        assert contingency_pvalue(plain, drafted, position) > 1e-3
    draft_alone = sample_marginals(LLM(draft, block_size=4), prompt, samples=1500)
    assert min(contingency_pvalue(plain, draft_alone, p) for p in range(3)) < 1e-6


# ---------------------------------------------------------------- KV blocks


@pytest.fixture(scope="module")
def speculative_llm(target, draft):
    return LLM(target, block_size=4, speculative_config=spec_config("draft", target, draft))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schedule=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 12), st.booleans(), st.integers(0, 6),
                                   st.booleans()), min_size=1, max_size=8),
       blocks=st.integers(10, 40))
def test_every_block_returns_after_rejections(speculative_llm, schedule, blocks):
    """Random arrivals, lengths, sampling and aborts with a draft that is often rejected: no block is leaked."""
    llm = speculative_llm
    engine = Engine(llm._runner, llm.tokenizer, model_name="t", num_blocks=blocks, max_num_batched_tokens=16,
                    host=llm.engine._host, speculator=llm.engine.speculator)
    pending = list(enumerate(schedule))
    live: list[str] = []
    step = 0
    while pending or engine.has_unfinished():
        for entry in list(pending):
            index, (length, max_tokens, abort, at, sampled) = entry
            if at <= step:
                pending.remove(entry)
                if length >= blocks * 4:
                    continue
                engine.add_request(str(index), prompts_of([length], seed=index, repeat=True)[0],
                                   SamplingParams(max_tokens=max_tokens, ignore_eos=True, n=1 + index % 2,
                                                  temperature=0.8 if sampled else 0.0, seed=index))
                if abort:
                    live.append(str(index))
        if live and step % 3 == 2:
            engine.abort(live.pop())
        engine.step()
        step += 1
        assert step < 2000
    assert engine.cache.num_used_blocks == 0
    assert engine.cache.num_free_blocks == blocks
    assert engine.speculator.proposer._states == {}


# ---------------------------------------------------------------- adaptive k


def test_expected_tokens_and_the_best_length():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    cheap = {"step_fixed": 1.0, "step_per_token": 0.01, "draft_step": 0.01}
    assert best_length([0.9], 6, **cheap) == 6
    assert best_length([0.0], 6, **cheap) == 0
    assert best_length([0.01] * 4, 6, **cheap) == 0
    # a big batch whose step cost is all per token: verifying drafts costs what it saves
    assert best_length([0.6] * 32, 6, step_fixed=0.01, step_per_token=1.0, draft_step=0.0) == 0


def test_drafts_that_run_on_once_started_are_drafted_long():
    """Copies: the first draft is kept half the time, but once it is, so are the rest. One per-token rate
    (0.5 overall) would draft 1 or 2; the measured continuation makes 8 pay."""
    assert expected_tokens(0.5, 3, [1.0, 1.0]) == 1 + 0.5 * 3
    assert expected_tokens(0.5, 3, [0.5, 0.5]) == pytest.approx(expected_tokens(0.5, 3))
    costs = {"step_fixed": 1e-3, "step_per_token": 0.1e-3, "draft_step": 0.0}
    assert best_length([0.5], 8, **costs) <= 2
    assert best_length([0.5], 8, **costs, continuation=[1.0] * 7) == 8
    length = SpeculationLength(8)
    length.EXPLORE_EVERY = 10**9
    for _ in range(30):
        length.record_step(1, 1e-3)
        length.record_step(9, 1.8e-3)
    for _ in range(100):  # all or nothing: 8 of 8, or the first rejected
        length.record_verification("r", 8, 8)
        length.record_verification("r", 8, 0)
    assert length.continuation()[0] > 0.9 and length.lengths(["r"])[0] == 8


def test_every_so_often_a_step_drafts_nothing_to_measure_plain_steps():
    length = SpeculationLength(4)
    for _ in range(30):
        length.record_step(1, 1e-3)
        length.record_step(5, 2e-3)
    chosen = [length.lengths(["r"])[0] for _ in range(3 * SpeculationLength.EXPLORE_EVERY)]
    assert [i for i, k in enumerate(chosen) if k == 0] == [15, 31, 47]


def test_no_probes_where_even_perfect_drafts_would_not_pay():
    length = SpeculationLength(4)
    for _ in range(30):  # every verified token costs as much as a step's own: a big batch's cost
        length.record_step(32, 32e-3)
        length.record_step(160, 160e-3)
    batch = [f"r{i}" for i in range(32)]
    for request_id in batch:
        length.record_verification(request_id, 4, 4)  # drafts that were all accepted
    chosen = [length.lengths(batch) for _ in range(4 * SpeculationLength.PROBE_EVERY)]
    assert all(k == 0 for ks in chosen for k in ks)


def test_the_drafting_cost_follows_the_batch_size():
    length = SpeculationLength(4)
    for _ in range(30):
        length.record_step(1, 1e-3)
        length.record_step(16, 4e-3)  # 0.8 ms fixed, 0.2 ms a token
    length.record_drafting(4, 4 * 0.4e-3, batch=1)  # a draft forward costs 0.4 of a target step
    assert length.draft_seconds(1) == pytest.approx(0.4e-3, rel=0.01)
    assert length.draft_seconds(16) == pytest.approx(0.4 * 4e-3, rel=0.01)
    batch = [f"r{i}" for i in range(16)]
    for request_id in batch:
        length.record_verification(request_id, 4, 3)
    # at batch 1 these drafts pay; at batch 16, where a draft forward costs 1.6 ms, they would not
    assert length.lengths(["r0"])[0] > 0
    assert length.lengths(batch) == [0] * 16
    # sampled requests' drafting (a forward a step, drawn in torch) is timed apart; until it is, the greedy's
    assert length.draft_seconds(1, greedy=False) == length.draft_seconds(1)
    length.record_drafting(4, 4 * 0.9e-3, batch=1, greedy=False)
    assert length.draft_seconds(1, greedy=False) == pytest.approx(0.9e-3, rel=0.01)
    assert length.draft_seconds(1) == pytest.approx(0.4e-3, rel=0.01)
    # once drafting at batch 16 is measured dearer than batch 1's ratio says, batch 16 goes by its own
    length.record_drafting(4, 4 * 0.8 * 4e-3, batch=16)
    assert length.draft_seconds(16) == pytest.approx(0.8 * 4e-3, rel=0.01)
    assert length.draft_seconds(1) == pytest.approx(0.4e-3, rel=0.01)
    assert length.draft_seconds(12) == pytest.approx(0.8 * length.step_seconds(12), rel=0.01)  # nearest: 16


def test_lengths_shrink_when_drafts_are_rejected_and_probe_again():
    length = SpeculationLength(4)
    length.EXPLORE_EVERY = 10**9  # probes alone here
    for _ in range(30):
        length.record_step(1, 1e-3)
        length.record_step(5, 2e-3)  # each verified token costs a quarter of a step
    assert length.lengths(["r"])[0] >= 2  # the prior acceptance (0.7) pays for a few drafts
    for _ in range(20):
        length.record_verification("r", 4, 0)
    assert length.acceptance("r") < 0.1
    wait = SpeculationLength.PROBE_EVERY
    for _ in range(3):  # each rejected probe doubles the wait before the next
        chosen = [length.lengths(["r"])[0] for _ in range(wait)]
        assert chosen[:-1] == [0] * (wait - 1) and chosen[-1] == 1
        length.record_verification("r", 1, 0)
        wait *= 2
    chosen = [length.lengths(["r"])[0] for _ in range(wait)]
    assert chosen[-1] == 1
    length.record_verification("r", 1, 1)  # an accepted probe: back to the first wait
    chosen = [length.lengths(["r"])[0] for _ in range(SpeculationLength.PROBE_EVERY)]
    assert chosen[-1] == 1


def test_a_useless_draft_is_soon_dropped(target, draft):
    """The random draft is rarely right: adaptive k stops drafting after a few verifications."""
    llm = LLM(target, block_size=4, speculative_model=str(draft), num_speculative_tokens=4)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    outputs = llm.generate(prompts_of([9], seed=2), params)
    stats = llm.engine.stats()
    assert stats["spec_decode_num_draft_tokens"] < 30
    assert len(outputs[0].outputs[0].token_ids) == 60


# ---------------------------------------------------------------- proposers and config


def test_prompt_lookup_takes_the_longest_most_recent_ngram():
    assert lookup_ngram([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3], 3) == [7, 8, 5]
    assert lookup_ngram([1, 2, 3, 4, 2, 3], 2, min_n=2, max_n=2) == [4, 2]
    assert lookup_ngram([5, 6, 7], 3) == []
    assert lookup_ngram([4, 4, 4, 4], 5) == [4, 4, 4, 4, 4]  # one token follows it; the copy runs on
    assert lookup_ngram([1, 2, 3, 1, 2, 3, 1, 2], 7) == [3, 1, 2, 3, 1, 2, 3]  # a period of 3 drafted on
    assert lookup_ngram([7, 1, 2, 3, 9, 1, 2, 3], 2, max_n=3) == [9, 1]  # far enough back: a plain copy


def test_config_spellings():
    assert SpeculativeConfig.build() is None
    assert SpeculativeConfig.build("[ngram]", 5).method == "ngram"
    assert SpeculativeConfig.build("[self]").method == "self"
    config = SpeculativeConfig.build("some/draft", 2)
    assert (config.method, config.model, config.num_speculative_tokens) == ("draft", "some/draft", 2)
    assert SpeculativeConfig.build(speculative_config={"model": "[ngram]"}).method == "ngram"


@pytest.mark.parametrize(("fields", "message"), [
    ({"method": "tree"}, "unknown"),
    ({"method": "draft"}, "needs a draft model"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ({"method": "ngram", "beam": 2}, "its fields are"),
])
def test_bad_configs_are_refused_by_name(fields, message):
    with pytest.raises(BadRequestError, match=message):
        SpeculativeConfig.build(speculative_config=fields)


def test_a_draft_with_another_vocabulary_is_refused(target, tmp_path):
    from enigma.testing import make_tiny_llama

    other = make_tiny_llama(tmp_path / "bytes")
    with pytest.raises(BadRequestError, match="vocabulary of 258 tokens but the target's has"):
        LLM(target, speculative_model=str(other))


def test_self_draft_layers_must_leave_the_target_deeper(target):
    with pytest.raises(BadRequestError, match="draft_layers = 3 is invalid for a model of 3 layers"):
        LLM(target, speculative_config={"method": "self", "draft_layers": 3})


def test_a_scheduler_without_lookahead_cannot_run_a_draft_model(target, draft, make_plugin_host):
    import types

    from enigma import hookimpl
    from enigma.engine.scheduler import Scheduler

    class Plain(Scheduler):
        def __init__(self, cache, *, max_num_seqs, max_num_batched_tokens):
            super().__init__(cache, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)

    plugin = types.ModuleType("plain_scheduler")
    plugin.enigma_register_schedulers = hookimpl(lambda register: register("plain", Plain))
    make_plugin_host(plugin, install=True)
    with pytest.raises(PluginError, match="takes no num_lookahead_tokens"):
        LLM(target, scheduler="plain", speculative_model=str(draft))
    ngram = LLM(target, scheduler="plain", speculative_model="[ngram]")  # needs no lookahead
    assert ngram.generate([[0, 5, 6, 5, 6, 5]], SamplingParams(max_tokens=5))[0].outputs[0].token_ids
