"""Structured output through the LLM API: completions that follow a JSON schema, a regex, a choice or a
grammar, greedy and sampled, alone and batched with free requests; bad asks refused by name."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from enigma import LLM, BadRequestError, SamplingParams
from enigma.guided import GuidedDecodingParams

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 130},
    "languages": {"type": "array", "items": {"enum": ["python", "c", "rust"]}, "maxItems": 3},
    "employed": {"type": "boolean"}},
    "required": ["name", "age", "languages", "employed"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm():
    return LLM("enigma-tiny")


def generate(llm, prompts, **guided):
    params = [SamplingParams(temperature=temperature, seed=seed, max_tokens=120, guided_decoding=guided)
              for temperature, seed in prompts]
    return [output.outputs[0] for output in llm.generate(["Describe a programmer:"] * len(prompts), params)]


def test_json_schema_answers_validate_greedy_and_sampled(llm):
    outputs = generate(llm, [(0, None)] + [(1.0, seed) for seed in range(6)], json=PERSON)
    for output in outputs:
        assert output.finish_reason == "stop", output.text
        jsonschema.validate(json.loads(output.text), PERSON)
    assert len({output.text for output in outputs[1:]}) > 1  # sampling still samples, within the schema


def test_regex_choice_grammar_and_json_object(llm):
    for output in generate(llm, [(1.0, seed) for seed in range(4)], regex=r"[A-Z][a-z]{2,8} \d{2,4}"):
        assert re.fullmatch(r"[A-Z][a-z]{2,8} \d{2,4}", output.text), output.text
    choices = ["list", "tuple", "dict"]
    assert {output.text for output in generate(llm, [(1.0, s) for s in range(8)], choice=choices)} <= set(choices)
    gbnf = 'root ::= "def " name "(" name? "):"\nname ::= [a-z_]{1,8}'
    for output in generate(llm, [(0, None), (1.0, 1), (1.0, 2)], grammar=gbnf):
        assert re.fullmatch(r"def [a-z_]{1,8}\(([a-z_]{1,8})?\):", output.text), output.text
    lark = 'start: "x = " NUMBER\nNUMBER: /[0-9]{1,3}/'
    assert re.fullmatch(r"x = [0-9]{1,3}", generate(llm, [(1.0, 3)], grammar=lark)[0].text)
    for output in generate(llm, [(0, None), (1.0, 5)], json_object=True):
        assert isinstance(json.loads(output.text), dict)


def test_constrained_and_free_requests_share_a_batch(llm):
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = llm.generate(["The list type"], free)[0].outputs[0].token_ids
    mixed = llm.generate(["The list type", "Describe a programmer:", "The list type"],
                         [free, SamplingParams(temperature=0, max_tokens=120, guided_decoding={"json": PERSON}),
                          free])
    assert mixed[0].outputs[0].token_ids == alone and mixed[2].outputs[0].token_ids == alone
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), PERSON)


def test_n_completions_each_follow_the_schema(llm):
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=120, guided_decoding={"json": PERSON})
    for completion in llm.generate(["Describe a programmer:"], params)[0].outputs:
        jsonschema.validate(json.loads(completion.text), PERSON)


def test_a_short_budget_ends_with_length(llm):
    output = llm.generate(["Describe:"], SamplingParams(temperature=0, max_tokens=5,
                                                         guided_decoding={"json": PERSON}))[0].outputs[0]
    assert output.finish_reason == "length" and output.text.startswith("{")


@pytest.mark.parametrize("ask,message", [
    ({}, "exactly one of json, regex, choice, grammar and json_object; got none"),
    ({"regex": "a", "choice": ["a"]}, "got regex, choice"),
    ({"regex": "[a-z"}, "(?s)guided regex: .*unclosed character class"),
    ({"json": "{not json"}, "the schema is not JSON"),
    ({"json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "guided json"),
    ({"choice": []}, "non-empty list of non-empty strings"),
    ({"grammar": "root ::= undefined_rule"}, "guided grammar"),
])
def test_bad_asks_are_refused_by_name(ask, message):
    with pytest.raises(BadRequestError, match=message):
        GuidedDecodingParams(**ask)


def test_sampling_params_take_a_dict_and_refuse_unknown_keys():
    assert SamplingParams(guided_decoding={"regex": "a+"}).guided_decoding == GuidedDecodingParams(regex="a+")
    with pytest.raises(BadRequestError, match="guided_decoding"):
        SamplingParams(guided_decoding={"schema": {}})


def random_schema(rng, depth: int = 0) -> dict:
    """A JSON schema of the kinds people send: nested objects, arrays, enums, anyOf, string formats,
    required and optional properties. Sizes are bounded so that a 5M-parameter model's answers end:
    unbounded lexemes (a float's decimals, an e-mail address, a date-time's fractional seconds) let it
    run on until max_tokens, validly but without end."""
    leaves = [
        lambda: {"type": "string", "maxLength": rng.randint(1, 12)},
        lambda: {"type": "string", "format": rng.choice(["date", "uuid", "ipv4"])},
        lambda: {"type": "string", "pattern": rng.choice([r"^[a-z]{2,6}$", r"^\d{3}-\d{2}$", r"^[A-Z][a-z]+$"])},
        lambda: {"type": "integer", "minimum": rng.randint(-50, 0), "maximum": rng.randint(1, 500)},
        lambda: {"type": "number", "enum": [0.5, 1.25, 99.9]},
        lambda: {"type": "boolean"},
        lambda: {"enum": rng.sample(["red", "green", "blue", "cyan", 1, 2, None, True], rng.randint(2, 4))},
        lambda: {"const": rng.choice(["v1", 3, False])},
        lambda: {"type": "null"},
    ]
    nodes = []
    if depth < 2:
        nodes = [
            lambda: {"type": "array", "items": random_schema(rng, depth + 1), "minItems": rng.randint(0, 1),
                     "maxItems": rng.randint(1, 3)},
            lambda: {"anyOf": [random_schema(rng, depth + 1), random_schema(rng, depth + 1)]},
            lambda: object_schema(rng, depth + 1),
        ]
    return rng.choice(leaves + nodes * 2)()


def object_schema(rng, depth: int) -> dict:
    names = rng.sample(["id", "name", "tags", "when", "score", "owner", "items", "ok", "kind", "note"],
                       rng.randint(1, 4))
    properties = {name: random_schema(rng, depth) for name in names}
    required = rng.sample(names, rng.randint(0, len(names)))
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def test_fifty_schemas_times_three_seeds_all_validate(llm):
    import random

    rng = random.Random(20261202)
    schemas = [object_schema(rng, 0) for _ in range(50)]
    params = [SamplingParams(temperature=temperature, seed=seed, max_tokens=400, guided_decoding={"json": schema})
              for schema in schemas for temperature, seed in ((0, None), (1.0, 1), (1.0, 2))]
    outputs = llm.generate(["Give the record as JSON:"] * len(params), params)
    checker = jsonschema.FormatChecker()
    failures = []
    for param, output in zip(params, outputs):
        completion = output.outputs[0]
        schema = json.loads(param.guided_decoding.json)
        try:
            assert completion.finish_reason == "stop", f"ended by {completion.finish_reason}"
            jsonschema.validate(json.loads(completion.text), schema, format_checker=checker)
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            failures.append(f"{json.dumps(schema)}\n  -> {completion.text!r}: {str(exc)[:200]}")
    assert not failures, f"{len(failures)} of {len(params)}:\n" + "\n".join(failures)


def test_the_sampler_lets_a_grammar_end_what_min_tokens_forbids():
    import torch

    from enigma.sampling import SamplingRow, sample

    eos = 3
    for temperature in (0.0, 1.0):
        row = SamplingRow(SamplingParams(temperature=temperature, min_tokens=5), [1, 2], [], stop_ids=frozenset({eos}),
                          constraint=object())
        only_eos = torch.zeros((1, 8), dtype=torch.bool)
        only_eos[0, eos] = True
        assert sample(torch.randn(1, 8), [row], masks=only_eos).token_ids == [eos]
