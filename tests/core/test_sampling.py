"""SamplingParams validation and sampling behaviour through the LLM API."""

from __future__ import annotations

import math

import pytest
import torch

from enigma import LLM, BadRequestError, SamplingParams
from enigma.sampling import SamplingRow, apply_penalties, sample


@pytest.mark.parametrize("field,value,message", [
    ("temperature", -0.5, "temperature = -0.5 is invalid: expected a number ≥ 0"),
    ("top_p", 0.0, "top_p = 0.0 is invalid: expected a number in (0, 1]"),
    ("top_p", 1.5, "top_p = 1.5 is invalid"),
    ("top_k", -2, "top_k = -2 is invalid: expected -1, 0 (both mean off) or ≥ 1"),
    ("min_p", 2, "min_p = 2 is invalid: expected a number in [0, 1]"),
    ("repetition_penalty", 0, "repetition_penalty = 0 is invalid: expected a number > 0"),
    ("presence_penalty", 3, "presence_penalty = 3 is invalid: expected a number in [-2, 2]"),
    ("frequency_penalty", -2.5, "frequency_penalty = -2.5 is invalid"),
    ("max_tokens", 0, "max_tokens = 0 is invalid: expected an integer ≥ 1"),
    ("min_tokens", -1, "min_tokens = -1 is invalid"),
    ("n", 0, "n = 0 is invalid: expected an integer ≥ 1"),
    ("logprobs", 21, "logprobs = 21 is invalid: expected an integer ≥ 0 and ≤ 20"),
    ("seed", "7", "seed = '7' is invalid: expected an integer"),
    ("temperature", float("nan"), "temperature = nan is invalid"),
    ("stop", [1], "stop must be a string or a list of strings"),
    ("stop", [""], "stop strings must not be empty"),
    ("stop_token_ids", "2", "stop_token_ids must be a list of integers"),
])
def test_invalid_values_name_the_field_and_range(field, value, message):
    with pytest.raises(BadRequestError) as info:
        SamplingParams(**{field: value})
    assert message in str(info.value)


def test_min_tokens_over_max_tokens():
    with pytest.raises(BadRequestError, match=r"min_tokens \(5\) must not exceed max_tokens \(3\)"):
        SamplingParams(min_tokens=5, max_tokens=3)


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="\n").stop == ("\n",)


def test_penalties_follow_their_definitions():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    row = SamplingRow(SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
                      prompt_token_ids=[0], output_token_ids=[1, 2, 2])
    out = apply_penalties(logits.clone(), [row])[0].tolist()
    assert out == pytest.approx([1.0, -4.0 - 0.5 - 0.25, 0.5 - 0.5 - 0.5, 0.5])


def test_penalties_skip_ids_outside_the_logits():
    # a tokenizer's added tokens past the model's logits (and a stray negative id) penalise nothing
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    row = SamplingRow(SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0), prompt_token_ids=[5, -1],
                      output_token_ids=[3, 1])
    assert apply_penalties(logits.clone(), [row])[0].tolist() == [2.0, -5.0, 1.0]


def test_penalties_of_a_mixed_batch_equal_each_rows_own():
    # transformers' repetition penalty (over prompt and output) is the oracle; frequency and presence follow
    # OpenAI's definition: logit - frequency * count - presence * (count > 0)
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(5, 30, generator=generator) * 2
    rows = [SamplingRow(SamplingParams(repetition_penalty=1.3), [1, 2, 3], [4, 4, 9]),
            SamplingRow(SamplingParams(), [5], [6]),
            SamplingRow(SamplingParams(frequency_penalty=0.5, presence_penalty=-0.25), [7], [8, 8, 8, 2]),
            SamplingRow(SamplingParams(repetition_penalty=0.8, frequency_penalty=1.0), [], [11, 29, 11]),
            SamplingRow(SamplingParams(min_tokens=3, presence_penalty=1.0), [0], [12], stop_ids=frozenset({1, 2}))]
    out = apply_penalties(logits.clone(), rows)
    for index, row in enumerate(rows):
        expected = logits[index:index + 1].clone()
        if row.params.repetition_penalty != 1.0:
            ids = torch.tensor([[*row.prompt_token_ids, *row.output_token_ids]])
            expected = RepetitionPenaltyLogitsProcessor(row.params.repetition_penalty)(ids, expected)
        expected = expected[0]
        for token in set(row.output_token_ids):
            count = row.output_token_ids.count(token)
            expected[token] -= row.params.frequency_penalty * count + row.params.presence_penalty
        if len(row.output_token_ids) < row.params.min_tokens:
            expected[list(row.stop_ids)] = float("-inf")
        torch.testing.assert_close(out[index], expected)


def test_min_tokens_masks_stop_ids():
    row = SamplingRow(SamplingParams(min_tokens=2, temperature=0), [0], [], stop_ids=frozenset({3}))
    assert sample(torch.tensor([[0.0, 1.0, 2.0, 9.0]]), [row]).token_ids == [2]


def test_top_k_top_p_min_p_limit_the_candidates():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for params, allowed in [(SamplingParams(top_k=2, seed=0), {0, 1}),
                            (SamplingParams(top_p=0.7, seed=0), {0, 1}),
                            (SamplingParams(min_p=0.5, seed=0), {0, 1})]:
        seen = set()
        generator = torch.Generator().manual_seed(0)
        for _ in range(200):
            seen |= set(sample(logits, [SamplingRow(params, [], [], generator=generator)]).token_ids)
        assert seen == allowed, params


def test_one_batch_of_mixed_filters_equals_transformers_warpers_row_by_row():
    # the sampler filters every drawn row of a step at once; transformers' warpers, applied to each row on its
    # own, are the oracle (top-p keeps the token that crosses the limit in both)
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from enigma.sampling import sampling_probs

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 50, generator=generator) * 3
    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=5),
              SamplingParams(top_p=0.8), SamplingParams(temperature=0.9, top_k=12, top_p=0.6),
              SamplingParams(min_p=0.1, temperature=1.1), SamplingParams(temperature=0)]
    probs = sampling_probs(logits, [SamplingRow(p, [], []) for p in params])
    for row, p in enumerate(params[:-1]):
        expected = TemperatureLogitsWarper(p.temperature)(None, logits[row:row + 1].clone())
        if p.top_k:
            expected = TopKLogitsWarper(p.top_k)(None, expected)
        if p.top_p < 1:
            expected = TopPLogitsWarper(p.top_p)(None, expected)
        if p.min_p:
            expected = MinPLogitsWarper(p.min_p)(None, expected)
        torch.testing.assert_close(probs[row], expected.softmax(-1)[0], rtol=1e-5, atol=1e-7)
    assert probs[-1].tolist() == torch.nn.functional.one_hot(logits[-1].argmax(), 50).float().tolist()
    token_ids = sample(logits, [SamplingRow(p, [], []) for p in params]).token_ids
    assert all(probs[row, token] > 0 for row, token in enumerate(token_ids))


def test_logprobs_of_a_mixed_batch_equal_each_rows_own():
    from enigma.sampling import top_logprobs

    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 40, generator=generator)
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0),
              SamplingParams(temperature=0.8, logprobs=0, seed=1), SamplingParams(temperature=0, logprobs=5),
              SamplingParams(temperature=1.0, logprobs=1, seed=2)]
    out = sample(logits, [SamplingRow(p, [], [], generator=torch.Generator().manual_seed(p.seed or 0))
                          for p in params])
    raw = torch.log_softmax(logits, dim=-1)
    for row, p in enumerate(params):
        if p.logprobs is None:
            assert out.logprobs[row] is None
            continue
        assert out.logprobs[row] == top_logprobs(raw[row], out.token_ids[row], p.logprobs)
        assert len(out.logprobs[row]) in (p.logprobs, p.logprobs + 1)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from tiny_models import make_model

    return LLM(make_model(tmp_path_factory.mktemp("llm"), "llama-gqa", seed=5))


def test_same_seed_same_output_different_seed_differs(llm):
    params = SamplingParams(temperature=1.0, max_tokens=24, seed=1234, ignore_eos=True)
    first = llm.generate("Once upon a time", params)[0].outputs[0].token_ids
    again = llm.generate("Once upon a time", params)[0].outputs[0].token_ids
    other = llm.generate("Once upon a time", SamplingParams(temperature=1.0, max_tokens=24, seed=99,
                                                            ignore_eos=True))[0].outputs[0].token_ids
    assert first == again
    assert first != other


def test_n_completions_with_a_seed_differ_from_each_other(llm):
    result = llm.generate("The fox", SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=7, ignore_eos=True))[0]
    assert [o.index for o in result.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in result.outputs}) == 3


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate("Paged", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    top1 = llm.generate("Paged", SamplingParams(temperature=0.8, top_k=1, max_tokens=16, seed=3, ignore_eos=True))
    assert greedy[0].outputs[0].token_ids == top1[0].outputs[0].token_ids


def test_stop_string_ends_the_text_and_never_leaks(llm):
    base = llm.generate("Once", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0]
    stop = base.text[10:13]
    assert len(stop) == 3
    cut = llm.generate("Once", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))
    output = cut[0].outputs[0]
    assert output.text == base.text[: base.text.find(stop)]
    assert (output.finish_reason, output.stop_reason) == ("stop", stop)
    kept = llm.generate("Once", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop],
                                               include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == base.text[: base.text.find(stop) + len(stop)]


def test_stop_token_ids_and_max_tokens(llm):
    base = llm.generate("Once", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    assert (len(base.token_ids), base.finish_reason, base.stop_reason) == (20, "length", None)
    stop_token = base.token_ids[5]
    out = llm.generate("Once", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                              stop_token_ids=[stop_token]))[0].outputs[0]
    assert out.token_ids == base.token_ids[: base.token_ids.index(stop_token) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_token)


def test_eos_stops_unless_ignored_or_too_early(llm):
    from enigma.sequence import Sequence

    def run(params, tokens):
        sequence = Sequence(index=0, prompt_token_ids=[0, 9], params=params, tokenizer=llm.tokenizer,
                            eos_token_ids=[1], max_model_len=512)
        for token in tokens:
            sequence.append(token)
            if sequence.finished:
                break
        return sequence

    stopped = run(SamplingParams(max_tokens=10), [20, 1, 21])
    assert (stopped.output_token_ids, stopped.finish_reason, stopped.stop_reason) == ([20, 1], "stop", None)
    ignored = run(SamplingParams(max_tokens=10, ignore_eos=True), [20, 1, 21])
    assert (ignored.output_token_ids, ignored.finished) == ([20, 1, 21], False)
    early = run(SamplingParams(max_tokens=10, min_tokens=3), [1, 1, 1, 22])
    assert (early.output_token_ids, early.finish_reason) == ([1, 1, 1], "stop")


def test_stream_delta_holds_back_a_possible_stop_string(llm):
    from enigma.sequence import Sequence

    ids = llm.tokenizer.encode("abc END tail", add_special_tokens=False)
    sequence = Sequence(index=0, prompt_token_ids=[0], params=SamplingParams(stop=["END"], max_tokens=50),
                        tokenizer=llm.tokenizer, eos_token_ids=[1], max_model_len=512)
    streamed = ""
    for token in ids:
        sequence.append(token)
        streamed += sequence.stream_delta()
        assert "E" not in streamed or sequence.finished
        if sequence.finished:
            break
    assert streamed + sequence.stream_delta() == "abc " == sequence.text


def test_logprobs_and_cumulative_logprob(llm):
    out = llm.generate("Once", SamplingParams(temperature=1.0, max_tokens=8, seed=2, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    total = 0.0
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and 3 <= len(entry) <= 4
        assert entry[token].decoded_token == llm.tokenizer.decode([token], skip_special_tokens=False)
        ranks = sorted(lp.rank for tid, lp in entry.items() if tid != token)
        assert ranks[:3] == [1, 2, 3] or entry[token].rank <= 3
        total += entry[token].logprob
    assert math.isclose(out.cumulative_logprob, total, rel_tol=1e-6)


def test_repetition_penalty_changes_greedy_output(llm):
    plain = llm.generate("ab ab ab", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    penalized = llm.generate("ab ab ab", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                        repetition_penalty=5.0))
    tokens = penalized[0].outputs[0].token_ids
    assert tokens != plain[0].outputs[0].token_ids
    assert len(set(tokens)) == len(tokens)  # a penalty of 5 on random weights forbids repeats
