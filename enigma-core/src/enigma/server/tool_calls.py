"""OpenAI tool calling: the ``tools`` a chat offers, how the model is told of them, what it may answer,
and its answer read back as ``tool_calls``.

Three formats, as open models write calls: ``hermes`` (Hermes, Qwen 2.5 and most others:
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``), ``llama3_json`` (Llama 3.1/3.2: a JSON
object ``{"name": ..., "parameters": {...}}``, several joined by ``; ``) and ``mistral``
(``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``). The format is the one the model's chat
template asks for (or ``enigma serve --tool-parser``). A model whose template renders ``tools`` itself
gets them that way; for one whose template does not, the tools are described in the system message
and earlier calls and results are written into the conversation as text. With ``tool_choice``
``"required"`` or a named function, generation is held to the format by a grammar (every call's
arguments valid against the function's parameters); with ``"auto"`` the model chooses and its answer
is parsed — in any of the three formats — text outside the calls becoming ``content``.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import attrs

from enigma.server.errors import APIError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_MARK = "[TOOL_CALLS]"
LLAMA_MARK = "<|python_tag|>"
FORMATS = ("hermes", "llama3_json", "mistral")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)


@attrs.frozen
class Tools:
    """The tools a request offers and how it lets the model use them."""

    functions: tuple[dict[str, Any], ...]
    """Each ``{"name", "description", "parameters"}``."""
    choice: str
    """``auto``, ``required`` or ``named``."""
    named: str | None = None
    parallel: bool = True
    format: str = "hermes"
    """How the model writes calls: ``hermes``, ``llama3_json`` or ``mistral``."""

    @property
    def constrained(self) -> bool:
        return self.choice in ("required", "named")

    def offered(self) -> tuple[dict[str, Any], ...]:
        """The functions the model may call (one, for a named choice)."""
        if self.named is None:
            return self.functions
        return tuple(function for function in self.functions if function["name"] == self.named)

    def as_openai(self) -> list[dict[str, Any]]:
        """The tools in OpenAI's (and Hugging Face chat templates') shape."""
        return [{"type": "function", "function": function} for function in self.offered()]


def tool_format(template: str, chosen: str | None = None) -> str:
    """The call format: ``chosen`` (``--tool-parser``), else the one the chat template asks for."""
    if chosen is not None:
        if chosen not in FORMATS:
            raise APIError(400, f"tool parser {chosen!r} is not one of {', '.join(FORMATS)}")
        return chosen
    if MISTRAL_MARK in template:
        return "mistral"
    if OPEN in template:
        return "hermes"
    if LLAMA_MARK in template or "ipython" in template:
        return "llama3_json"
    return "hermes"


def read_tools(body: dict[str, Any], *, format: str = "hermes") -> Tools | None:
    """The request's ``tools``, ``tool_choice`` and ``parallel_tool_calls``, checked; None without tools or
    with ``tool_choice: "none"``."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools:
        if choice not in (None, "none"):
            raise APIError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise APIError(400, "'tools' must be a list of {type: function, function: {name, description, "
                            "parameters}}", param="tools")
    functions = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"),
                                                                                              dict):
            raise APIError(400, f"'{where}' must be {{type: function, function: {{...}}}}", param=where)
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise APIError(400, f"'{where}.function.name' must be 1-64 letters, digits, '_' or '-'; got {name!r}",
                           param=where)
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise APIError(400, f"'{where}.function.parameters' must be a JSON schema object", param=where)
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise APIError(400, f"'{where}.function.description' must be a string", param=where)
        functions.append({"name": name, "description": description, "parameters": parameters})
    names = [function["name"] for function in functions]
    if len(set(names)) != len(names):
        raise APIError(400, "'tools' names a function twice", param="tools")
    parallel = body.get("parallel_tool_calls")
    parallel = True if parallel is None else parallel
    if choice is None or choice == "auto":
        return Tools(tuple(functions), "auto", parallel=parallel, format=format)
    if choice == "none":
        return None
    if choice == "required":
        return Tools(tuple(functions), "required", parallel=parallel, format=format)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise APIError(400, f"'tool_choice' names {name!r}, which is not among the tools ({', '.join(names)})",
                           param="tool_choice")
        return Tools(tuple(functions), "named", named=name, parallel=False, format=format)
    raise APIError(400, "'tool_choice' must be none, auto, required or {type: function, function: {name}}",
                   param="tool_choice")


# ---------------------------------------------------------------- the prompt


def template_renders_tools(template: str) -> bool:
    """Whether a chat template renders ``tools`` itself (it mentions them)."""
    return "tools" in template


def tool_instructions(tools: Tools) -> str:
    """The system-message text that tells a model of the tools, for templates that do not."""
    listed = "\n".join(json.dumps(tool) for tool in tools.as_openai())
    must = {"auto": "You may call one or more of these functions to help with the user's request.",
            "required": "You must call one or more of these functions.",
            "named": f"You must call the function {tools.named}."}[tools.choice]
    shape = {"hermes": f'inside {OPEN}{CLOSE} tags:\n{OPEN}\n{{"name": <function-name>, "arguments": '
                       f"<args-json-object>}}\n{CLOSE}",
             "llama3_json": 'as JSON, several separated by "; ":\n{"name": <function-name>, "parameters": '
                            "<args-json-object>}",
             "mistral": f'as a JSON list after {MISTRAL_MARK}:\n{MISTRAL_MARK}[{{"name": <function-name>, '
                        '"arguments": <args-json-object>}]'}[tools.format]
    return (f"# Tools\n\n{must}\n\nThe functions, as JSON schemas, one per line:\n<tools>\n{listed}\n</tools>\n\n"
            f"For each call, answer with the function's name and arguments {shape}")


def write_calls(calls: list[dict[str, Any]], format: str) -> str:
    """Earlier calls (an assistant message's ``tool_calls``) written as the model writes them."""
    pairs = [(call["function"]["name"], call["function"]["arguments_object"]) for call in calls]
    if format == "llama3_json":
        return "; ".join(json.dumps({"name": name, "parameters": arguments}) for name, arguments in pairs)
    if format == "mistral":
        return MISTRAL_MARK + json.dumps([{"name": name, "arguments": arguments} for name, arguments in pairs])
    return "\n".join(OPEN + json.dumps({"name": name, "arguments": arguments}) + CLOSE for name, arguments in pairs)


def prepare_messages(messages: list[dict[str, Any]], tools: Tools | None, *, native: bool,
                     format: str = "hermes") -> list[dict[str, Any]]:
    """The conversation as the template gets it. ``native`` templates get tool calls as structures (their
    arguments as objects) and tool results with their call ids; others get them written as text, and the
    tool instructions in the system message."""
    prepared = []
    for message in messages:
        calls = message.get("tool_calls")
        if native:
            entry = dict(message)
            if calls:
                entry["tool_calls"] = [{"id": call["id"], "type": "function", "function": {
                    "name": call["function"]["name"], "arguments": call["function"]["arguments_object"]}}
                    for call in calls]
            prepared.append(entry)
            continue
        content = message["content"]
        if calls:
            written = write_calls(calls, tools.format if tools is not None else format)
            content = f"{content}\n{written}" if content else written
        if message["role"] == "tool":
            content = f"<tool_response>\n{content}\n</tool_response>"
        prepared.append({"role": message["role"], "content": content})
    if tools is not None and not native:
        instructions = tool_instructions(tools)
        if prepared and prepared[0]["role"] == "system":
            prepared[0] = {**prepared[0], "content": f"{prepared[0]['content']}\n\n{instructions}"}
        else:
            prepared.insert(0, {"role": "system", "content": instructions})
    return prepared


def tool_grammar(tools: Tools) -> str:
    """The Lark grammar (llguidance's, with ``%json``) of a constrained answer in the tools' format: one
    call, or several when parallel calls are allowed, each naming an offered function with arguments
    valid for it. (Mistral's ``[TOOL_CALLS]`` is a special token there, dropped from the text: the
    grammar holds the list that follows it.)"""
    key = "parameters" if tools.format == "llama3_json" else "arguments"
    variants = [{"type": "object", "properties": {"name": {"const": function["name"]}, key: function["parameters"]},
                 "required": ["name", key], "additionalProperties": False}
                for function in tools.offered()]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    body = f"body: %json {json.dumps({**schema, 'x-guidance': {'whitespace_flexible': False}})}\n"
    if tools.format == "mistral":
        more = ' ("," body)*' if tools.parallel else ""
        return f'start: "[" body{more} "]"\n' + body
    if tools.format == "llama3_json":
        return ('start: body ("; " body)*\n' if tools.parallel else "start: body\n") + body
    calls = 'call ("\\n" call)*' if tools.parallel else "call"
    return f'start: {calls}\ncall: "{OPEN}" body "{CLOSE}"\n' + body


def auto_grammar(tools: Tools, *, trigger_is_special: bool) -> str | None:
    """For ``auto`` in the hermes format: free text, but once the model opens a ``<tool_call>`` the call
    must name an offered function and give it valid arguments (llguidance's structural tags: a lazy
    trigger). None for the other formats, whose calls have no trigger to wait for."""
    if tools.choice != "auto" or tools.format != "hermes":
        return None
    from llguidance._struct_tag import StructTag

    tags = [StructTag(trigger=OPEN, begin=f'{OPEN}\n{{"name": {json.dumps(function["name"])}, "arguments": ',
                      grammar=function["parameters"], end=f"}}\n{CLOSE}") for function in tools.offered()]
    return StructTag.to_grammar(tags, assume_special=trigger_is_special)


# ---------------------------------------------------------------- the answer


def parse_answer(text: str, tools: Tools) -> tuple[str | None, list[dict[str, Any]]]:
    """``(content, tool_calls)`` from the model's text, in any of the three formats: each well-formed call
    to an offered function becomes an OpenAI tool call; the text around ``<tool_call>`` tags is the
    content (None when empty). Anything else is content, never an error."""
    offered = {function["name"] for function in tools.offered()}
    calls = [call for match in _CALL.finditer(text) if (call := _read_call(match.group(1), offered))]
    if calls:
        return _CALL.sub("", text).strip() or None, calls
    body = text.strip()
    for mark in (MISTRAL_MARK, LLAMA_MARK):
        body = body.removeprefix(mark).strip()
    calls = _json_calls(body, offered)
    return (None, calls) if calls else (text, [])


def _json_calls(body: str, offered: set[str]) -> list[dict[str, Any]]:
    """Calls written as JSON: a list of objects (Mistral), or objects joined by ';' (Llama 3)."""
    if not body.startswith(("{", "[")):
        return []
    try:
        value = json.loads(body)
        objects = value if isinstance(value, list) else [value]
    except ValueError:
        objects = []
        for part in body.split(";"):
            try:
                objects.append(json.loads(part))
            except ValueError:
                return []
    calls = [_call_of(item, offered) for item in objects]
    return calls if calls and all(calls) else []


def _read_call(text: str, offered: set[str]) -> dict[str, Any] | None:
    try:
        return _call_of(json.loads(text), offered)
    except ValueError:
        return None


def _call_of(value: Any, offered: set[str]) -> dict[str, Any] | None:
    if not isinstance(value, dict) or value.get("name") not in offered:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


class StreamedText:
    """Text deltas of an ``auto`` answer that are safe to stream as content: everything before a
    ``<tool_call>`` tag (a tail that could be the tag's start is held back), or, in the JSON formats, an
    answer that does not open as JSON; from a call on, nothing — the calls are sent whole at the end."""

    def __init__(self, format: str = "hermes") -> None:
        self.text = ""
        self._sent = 0
        self._calling = False
        self._format = format

    def add(self, delta: str) -> str:
        self.text += delta
        if self._calling:
            return ""
        if self._format != "hermes" and self._sent == 0:  # JSON formats: an answer that opens as JSON is held
            start = self.text.lstrip()
            if not start:
                return ""
            if start.startswith(("{", "[", MISTRAL_MARK, LLAMA_MARK)):
                self._calling = True
                return ""
        at = self.text.find(OPEN, self._sent)
        if at != -1:
            self._calling = True
            out = self.text[self._sent:at]
            self._sent = at
            return out
        safe = len(self.text)
        for keep in range(min(len(OPEN) - 1, len(self.text)), 0, -1):
            if OPEN.startswith(self.text[-keep:]):
                safe -= keep
                break
        out = self.text[self._sent:safe]
        self._sent = max(self._sent, safe)
        return out

    def rest(self, calls_found: bool) -> str:
        """What is left to stream as content once the answer is whole (all of it, if what was held as
        a call was none)."""
        if calls_found:
            return ""
        out = self.text[self._sent:]
        self._sent = len(self.text)
        return out
