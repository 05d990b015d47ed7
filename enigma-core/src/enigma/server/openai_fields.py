"""Reading OpenAI request bodies: every field checked, nothing silently ignored.

A field of the wrong type, or one this server does not support, is a 400
naming it (``param``), never a silent truncation or a quietly dropped option.
"""

from __future__ import annotations

import json
from typing import Any

from enigma.server.errors import APIError

NUMBER = (int, float)

SAMPLING_FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "model": (str, "a string"),
    "max_tokens": (int, "an integer"),
    "temperature": (NUMBER, "a number"),
    "top_p": (NUMBER, "a number"),
    "n": (int, "an integer"),
    "stream": (bool, "a boolean"),
    "stream_options": (dict, "an object"),
    "stop": ((str, list), "a string or a list of strings"),
    "seed": (int, "an integer"),
    "presence_penalty": (NUMBER, "a number"),
    "frequency_penalty": (NUMBER, "a number"),
    "user": (str, "a string"),
    # vLLM's extensions (pass them with the SDK's extra_body)
    "top_k": (int, "an integer"),
    "min_p": (NUMBER, "a number"),
    "repetition_penalty": (NUMBER, "a number"),
    "min_tokens": (int, "an integer"),
    "ignore_eos": (bool, "a boolean"),
    # structured output: OpenAI's response_format, and vLLM's guided_* and structured_outputs
    "response_format": (dict, "an object: {type: text | json_object | json_schema, json_schema: {name, schema, "
                              "strict}}"),
    "guided_json": ((dict, str), "a JSON schema"),
    "guided_regex": (str, "a regular expression"),
    "guided_choice": (list, "a list of strings"),
    "guided_grammar": (str, "a grammar: Lark (llguidance) or GBNF"),
    "guided_decoding_backend": (str, "'guidance' or 'auto'"),
    "structured_outputs": (dict, "an object with one of json, regex, choice, grammar, json_object"),
}
CHAT_FIELDS = {**SAMPLING_FIELDS, "messages": (list, "a list of messages"),
               "max_completion_tokens": (int, "an integer"), "logprobs": (bool, "a boolean"),
               "top_logprobs": (int, "an integer"),
               "tools": (list, "a list of {type: function, function: {name, description, parameters}}"),
               "tool_choice": ((str, dict), "none, auto, required or {type: function, function: {name}}"),
               "parallel_tool_calls": (bool, "a boolean")}
COMPLETION_FIELDS = {**SAMPLING_FIELDS, "prompt": ((str, list), "a string, a list of strings or token ids"),
                     "logprobs": (int, "an integer"), "echo": (bool, "a boolean")}
EMBEDDING_FIELDS = {"model": (str, "a string"), "input": ((str, list), "a string or a list of strings"),
                    "encoding_format": (str, "'float' or 'base64'"), "user": (str, "a string"),
                    "dimensions": (int, "an integer")}
TOKENIZE_FIELDS = {"model": (str, "a string"), "prompt": (str, "a string"), "messages": (list, "a list of messages"),
                   "add_special_tokens": (bool, "a boolean"), "add_generation_prompt": (bool, "a boolean")}
DETOKENIZE_FIELDS = {"model": (str, "a string"), "tokens": (list, "a list of token ids")}
UNSUPPORTED = {
    "functions": "function calling (deprecated by OpenAI: use tools)",
    "function_call": "function calling (deprecated by OpenAI: use tool_choice)",
    "logit_bias": "logit bias", "suffix": "suffix insertion", "best_of": "best_of",
    "audio": "audio output", "modalities": "audio output",
    "prediction": "predicted outputs", "reasoning_effort": "reasoning effort", "service_tier": "service tiers",
    "store": "stored completions", "metadata": "stored completions", "web_search_options": "web search",
}
"""Fields OpenAI accepts that this server does not implement; accepted only with a no-op value."""
NO_OP_VALUES = {"logit_bias": [{}], "store": [False], "metadata": [None, {}],
                "best_of": [1], "suffix": [None, ""], "service_tier": ["auto", "default"]}


async def read_json(request: Any) -> dict[str, Any]:
    """The body as a JSON object; 400 for invalid UTF-8, malformed JSON or a non-object."""
    raw = await request.body()
    if not raw:
        raise APIError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"the request body is not valid UTF-8 ({exc.reason} at byte {exc.start})",
                       code="invalid_json") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column "
                            f"{exc.colno}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(body).__name__}",
                       code="invalid_json")
    return body


def check_fields(body: dict[str, Any], fields: dict[str, tuple[Any, str]]) -> None:
    """Refuse unknown and unsupported fields, and fields of the wrong type."""
    for key, value in body.items():
        if key in UNSUPPORTED:
            if value is None or value in NO_OP_VALUES.get(key, []):
                continue
            raise APIError(400, f"'{key}' ({UNSUPPORTED[key]}) is not supported by this server",
                           param=key, code="unsupported_parameter")
        if key not in fields:
            raise APIError(400, f"unknown parameter '{key}'; supported: {', '.join(sorted(fields))}",
                           param=key, code="unknown_parameter")
        kinds, description = fields[key]
        if value is None or kinds is object:
            continue
        if isinstance(value, bool) and kinds is not bool and bool not in (kinds if isinstance(kinds, tuple) else ()):
            raise APIError(400, f"'{key}' must be {description}, not a boolean", param=key, code="invalid_type")
        if not isinstance(value, kinds):
            raise APIError(400, f"'{key}' must be {description}, not {type(value).__name__}", param=key,
                           code="invalid_type")


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages as ``{"role", "content"}`` with string content (plus an assistant's
    ``tool_calls`` and a tool result's ``tool_call_id``)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    result = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise APIError(400, f"'{where}' must be an object", param=where)
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise APIError(400, f"'{where}.role' must be system, developer, user, assistant or tool; got {role!r}",
                           param=f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text is supported
            texts = []
            for part_index, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"'{where}.content[{part_index}]': only text parts are supported",
                                   param=f"{where}.content")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"'{where}.content' must be a string or a list of text parts",
                           param=f"{where}.content")
        entry: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
        if role == "assistant" and message.get("tool_calls"):
            entry["tool_calls"] = _check_tool_calls(message["tool_calls"], where)
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise APIError(400, f"'{where}.tool_call_id' is required on a tool message (a string)",
                               param=f"{where}.tool_call_id")
            entry["tool_call_id"] = call_id
            if isinstance(message.get("name"), str):
                entry["name"] = message["name"]
        result.append(entry)
    return result


def _check_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's earlier tool calls; each function's arguments also parsed (for templates)."""
    if not isinstance(calls, list):
        raise APIError(400, f"'{where}.tool_calls' must be a list", param=f"{where}.tool_calls")
    checked = []
    for index, call in enumerate(calls):
        at = f"{where}.tool_calls[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not isinstance(function.get("arguments"), str) or not isinstance(call.get("id"), str):
            raise APIError(400, f"'{at}' must be {{id, type: function, function: {{name, arguments: a JSON "
                                "string}}}}", param=at)
        try:
            arguments = json.loads(function["arguments"] or "{}")
        except ValueError:
            raise APIError(400, f"'{at}.function.arguments' is not JSON", param=at) from None
        checked.append({"id": call["id"], "type": "function",
                        "function": {"name": function["name"], "arguments": function["arguments"],
                                     "arguments_object": arguments}})
    return checked


def check_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(item, str) and item for item in stops) or len(stops) > 4:
        raise APIError(400, "'stop' must be a non-empty string or a list of up to 4 non-empty strings",
                       param="stop")
    return list(stops)


def check_prompt(prompt: Any) -> list[str | list[int]]:
    """A completion's prompts: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(item, str) for item in prompt):
            return list(prompt)
        if all(isinstance(item, int) and not isinstance(item, bool) for item in prompt):
            return [list(prompt)]
        if all(isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
               for item in prompt):
            return [list(item) for item in prompt]
    raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                        "lists of token ids (none empty)", param="prompt")
