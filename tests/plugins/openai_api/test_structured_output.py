"""Structured output over the OpenAI API with the real openai SDK: response_format (json_schema with
pydantic through the SDK's parse helper, json_object), vLLM's guided_* fields, streams; bad asks are 400s
naming the field."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest

MESSAGES = [{"role": "user", "content": "Describe a Python type."}]


class TypeCard(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    name: str = pydantic.Field(max_length=16)
    mutable: bool
    kind: Literal["sequence", "mapping", "set", "number"]
    methods: list[Literal["append", "pop", "keys", "add"]] = pydantic.Field(max_length=3)


def test_the_sdks_parse_helper_gets_a_valid_pydantic_object(client):
    completion = client.beta.chat.completions.parse(model="tiny", messages=MESSAGES, response_format=TypeCard,
                                                    max_tokens=200, temperature=0.7, seed=1)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, TypeCard)
    assert TypeCard.model_validate_json(message.content) == message.parsed


def test_json_schema_holds_for_sampled_answers_and_streams(client):
    schema = TypeCard.model_json_schema()
    response_format = {"type": "json_schema", "json_schema": {"name": "type_card", "schema": schema,
                                                              "strict": True}}
    replies = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=response_format,
                                             max_tokens=200, temperature=1.0, n=3, seed=5)
    for choice in replies.choices:
        jsonschema.validate(json.loads(choice.message.content), schema)
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=response_format,
                                            max_tokens=200, temperature=1.0, seed=6, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), schema)


def test_json_object_and_vllms_guided_fields(client):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=100, temperature=0,
                                           response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    choice = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=1.0,
                                            extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].message.content in ("yes", "no")
    completion = client.completions.create(model="tiny", prompt="Version:", max_tokens=12, temperature=1.0,
                                           extra_body={"guided_regex": r"\d\.\d{1,2}"})
    assert re.fullmatch(r"\d\.\d{1,2}", completion.choices[0].text)
    grammar = client.completions.create(model="tiny", prompt="Code:", max_tokens=20, temperature=1.0,
                                        extra_body={"guided_grammar": 'root ::= "x = " [0-9]{1,3}'})
    assert re.fullmatch(r"x = [0-9]{1,3}", grammar.choices[0].text)
    structured = client.completions.create(model="tiny", prompt="Pick:", max_tokens=10,
                                           extra_body={"structured_outputs": {"choice": ["red", "green"]}})
    assert structured.choices[0].text in ("red", "green")


@pytest.mark.parametrize("fields,param,message", [
    ({"response_format": {"type": "yaml"}}, "response_format", "must be text, json_object or json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format",
     "name' is required"),
    ({"guided_regex": "[unclosed"}, "guided_regex", "unclosed character class"),
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "nope"}}}}, "guided_json", "guided json"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice", "give one structured-output field"),
    ({"guided_decoding_backend": "outlines", "guided_regex": "a"}, "guided_decoding_backend", "'guidance'"),
])
def test_bad_asks_are_400s_naming_the_field(client, fields, param, message):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, extra_body=fields)
    assert error.value.body["param"] == param and message in error.value.body["message"]


def test_strict_schemas_take_no_other_properties(client):
    """OpenAI's strict mode needs additionalProperties: false; here it is the default under strict."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "inner": {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}}, "required": ["ok", "inner"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}
    for seed in range(4):
        reply = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=response_format,
                                               max_tokens=60, temperature=1.0, seed=seed)
        value = json.loads(reply.choices[0].message.content)
        assert set(value) == {"ok", "inner"} and set(value["inner"]) == {"n"}
