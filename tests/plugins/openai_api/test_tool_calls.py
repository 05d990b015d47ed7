"""OpenAI tool calling with the real openai SDK and LangChain against a real server: required and named
choices held to the functions' schemas, parallel calls, streams, multi-turn conversations with tool
results, templates that render tools themselves and ones that do not; bad asks refused by name."""

from __future__ import annotations

import json
import os
import subprocess

import jsonschema
import openai
import pytest
from serving import ENIGMA, launch, stop
from tiny_models import make_model

from enigma.server.tool_calls import StreamedText, Tools, parse_answer, prepare_messages, read_tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -999, "maximum": 999},
                                                    "b": {"type": "integer", "minimum": -999, "maximum": 999}},
                   "required": ["a", "b"], "additionalProperties": False}}}
"""Bounded, so that a random model's numbers end (a real model's do by themselves)."""
TOOLS = [WEATHER, ADD]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]


def check_call(call):
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_tool_choice_gives_valid_calls(client):
    reply = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=300, temperature=1.0, seed=3)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        check_call(call)


def test_a_named_function_is_called_once(client):
    for seed in range(3):
        reply = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=200,
                                               tool_choice={"type": "function", "function": {"name": "add"}},
                                               temperature=1.0, seed=seed)
        [call] = reply.choices[0].message.tool_calls
        assert call.function.name == "add"
        check_call(call)


def test_no_parallel_calls_means_one(client):
    reply = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=200, temperature=1.0, seed=4)
    assert len(reply.choices[0].message.tool_calls) == 1


def test_streamed_calls_equal_the_whole_answer(client):
    ask = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=300, temperature=0)
    whole = client.chat.completions.create(**ask).choices[0]
    chunks = list(client.chat.completions.create(**ask, stream=True))
    deltas = [call for chunk in chunks if chunk.choices for call in (chunk.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in deltas] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert [d.index for d in deltas] == list(range(len(deltas)))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def test_auto_lets_the_model_answer_in_text(client):
    """In auto a random model writes text (its answer is content); whatever calls it opens are valid."""
    for seed in range(4):
        reply = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=40,
                                               temperature=1.0, seed=seed)
        choice = reply.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            for call in choice.message.tool_calls:
                check_call(call)
        else:
            assert choice.finish_reason in ("stop", "length") and choice.message.content
            assert "<tool_call>" not in choice.message.content or choice.finish_reason == "length"


def test_a_conversation_with_tool_results_continues(client):
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=300, temperature=0).choices[0].message
    results = [{"role": "tool", "tool_call_id": call.id, "content": json.dumps({"ok": True})}
               for call in first.tool_calls]
    conversation = [*ASK, first.model_dump(exclude_none=True), *results]
    reply = client.chat.completions.create(model="tiny", messages=conversation, tools=TOOLS, max_tokens=6,
                                           temperature=0)
    opening = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=1, temperature=0)
    # the calls and their results are in the prompt: the arguments and every result's text
    arguments = sum(len(call.function.arguments) for call in first.tool_calls)
    assert reply.usage.prompt_tokens > opening.usage.prompt_tokens + arguments // 4


def test_langchain_binds_tools_and_reads_the_calls(server):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=f"{server[0]}/v1", api_key="unused", model="tiny", max_tokens=200,
                      temperature=0, max_retries=0)
    message = chat.bind_tools([ADD], tool_choice="add").invoke("What is 2 + 3?")
    [call] = message.tool_calls
    assert call["name"] == "add"
    jsonschema.validate(call["args"], SCHEMAS["add"])


@pytest.mark.parametrize("fields,param,message", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not among the tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0]", "letters, digits"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "twice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot be combined"),
    ({"functions": [{"name": "x"}]}, "functions", "deprecated by OpenAI: use tools"),
])
def test_bad_asks_are_400s_naming_the_field(client, fields, param, message):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=5, extra_body=fields)
    assert error.value.body["param"] == param and message in error.value.body["message"]


def test_tool_messages_need_their_call_id(client):
    with pytest.raises(openai.BadRequestError, match="tool_call_id"):
        client.chat.completions.create(model="tiny", max_tokens=5, messages=[
            *ASK, {"role": "tool", "content": "{}"}])


# ---------------------------------------------------------------- a template that renders tools


@pytest.fixture(scope="module")
def qwen_server(tmp_path_factory):
    """A server whose model's chat template renders tools itself (Qwen 2.5's shape)."""
    home = tmp_path_factory.mktemp("tools-home")
    env = {**os.environ, "ENIGMA_HOME": str(home)}
    folder = make_model(tmp_path_factory.mktemp("qwen-tools"), "llama-gqa", template="qwen2_tools",
                        max_position_embeddings=4096)
    subprocess.run([str(ENIGMA), "pull", str(folder), "--name", "qwenish"], env=env, check=True,
                   capture_output=True)
    process, base = launch(env, "qwenish", log_path=home / "server.log")
    yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0), folder
    stop(process)


def test_a_template_that_renders_tools_gets_them(qwen_server):
    client, folder = qwen_server
    reply = client.chat.completions.create(model="qwenish", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=300, temperature=0)
    for call in reply.choices[0].message.tool_calls:
        check_call(call)
    plain = client.chat.completions.create(model="qwenish", messages=ASK, max_tokens=1, temperature=0)
    assert reply.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the tools were in the prompt

    from enigma.tokenizer import Tokenizer

    tokenizer = Tokenizer(folder)
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}',
                                                             "arguments_object": {"a": 2, "b": 3}}}
    messages = [*ASK, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    tools = read_tools({"tools": TOOLS})
    text = tokenizer.apply_chat_template(prepare_messages(messages, tools, native=True), tools=tools.as_openai())
    assert '"name": "get_weather"' in text and "<tools>" in text
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in text
    assert "<tool_response>\n5\n</tool_response>" in text


# ---------------------------------------------------------------- reading answers back


def test_answers_are_read_back_as_calls_and_content():
    tools = Tools(tuple(tool["function"] for tool in TOOLS), "auto")
    content, calls = parse_answer('Let me check.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
                                  '</tool_call>\n<tool_call>{"name": "get_weather", "arguments": '
                                  '"{\\"city\\": \\"Oslo\\", \\"unit\\": \\"celsius\\"}"}</tool_call>', tools)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo", "unit": "celsius"})]
    assert parse_answer('{"name": "add", "parameters": {"a": 1, "b": 1}}', tools)[1][0]["function"]["name"] == "add"
    assert parse_answer("<tool_call>{not json}</tool_call>", tools) == ("<tool_call>{not json}</tool_call>", [])
    assert parse_answer('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', tools)[1] == []
    assert parse_answer("Just text.", tools) == ("Just text.", [])


def test_streamed_text_holds_back_what_may_be_a_call():
    stream = StreamedText()
    pieces = [stream.add(delta) for delta in ["Sure", ", <tool", "_ca", 'll>{"name"', ': "add"}</tool_call>']]
    assert pieces == ["Sure", ", ", "", "", ""]
    assert stream.rest(calls_found=True) == ""
    stream = StreamedText()
    assert [stream.add("a <to"), stream.add("ad")] == ["a ", "<toad"]
    assert stream.rest(calls_found=False) == ""


@pytest.mark.parametrize("text,names", [
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', ["add"]),
    ('{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "get_weather", "parameters": '
     '{"city": "Rome", "unit": "celsius"}}', ["add", "get_weather"]),
    ('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', ["add"]),
    ('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "add", "arguments": {"a": 3, "b": 4}}]',
     ["add", "add"]),
    ('[{"name": "add", "arguments": {"a": 1, "b": 2}}]', ["add"]),  # the marker is a special token, dropped
])
def test_each_format_is_read_back(text, names):
    tools = Tools(tuple(tool["function"] for tool in TOOLS), "auto")
    content, calls = parse_answer(text, tools)
    assert content is None and [call["function"]["name"] for call in calls] == names


@pytest.mark.parametrize("text", ["[1, 2, 3]", '{"not": "a call"}', '{"name": "add", "arguments": 3}',
                                  '{"name": "add"} trailing', "[TOOL_CALLS][{broken"])
def test_malformed_output_stays_text(text):
    tools = Tools(tuple(tool["function"] for tool in TOOLS), "auto")
    assert parse_answer(text, tools) == (text, [])


@pytest.mark.parametrize("format", ["hermes", "llama3_json", "mistral"])
def test_each_formats_grammar_gives_calls_its_parser_reads(format):
    from enigma import LLM, SamplingParams
    from enigma.server.tool_calls import tool_grammar

    llm = LLM("enigma-tiny")
    for choice, parallel in (("required", True), ("required", False)):
        tools = Tools(tuple(tool["function"] for tool in TOOLS), choice, parallel=parallel, format=format)
        params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=300,
                                 guided_decoding={"grammar": tool_grammar(tools)}) for seed in range(3)]
        for output in llm.generate(["Call a tool:"] * 3, params):
            _, calls = parse_answer(output.outputs[0].text, tools)
            assert calls and (parallel or len(calls) == 1), output.outputs[0].text
            for call in calls:
                jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


def test_streamed_json_formats_hold_back_a_call():
    stream = StreamedText("mistral")
    assert [stream.add(" "), stream.add('[{"name"'), stream.add("...")] == ["", "", ""]
    stream = StreamedText("llama3_json")
    assert [stream.add("Hello"), stream.add(" there")] == ["Hello", " there"]


def test_serve_takes_a_tool_parser(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "ENIGMA_HOME": str(home)}
    home.mkdir()
    process, base = launch(env, "enigma-tiny", "--tool-parser", "llama3_json", log_path=home / "server.log")
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="enigma-tiny", messages=ASK, tools=[ADD],
                                               tool_choice="required", parallel_tool_calls=False, max_tokens=60,
                                               temperature=0)
        assert reply.choices[0].finish_reason == "tool_calls"
        for call in reply.choices[0].message.tool_calls:
            check_call(call)
    finally:
        stop(process)
