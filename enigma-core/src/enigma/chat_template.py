"""Rendering a model's chat template the way transformers does, sandboxed.

Templates come from model folders, which may come from anyone: they render
in jinja2's ``ImmutableSandboxedEnvironment``, so a template that reaches for
Python internals (``__class__``, ``__subclasses__``, mutating globals...) is
refused with :class:`~enigma.errors.BadRequestError`.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

from enigma.errors import BadRequestError

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""Used when a model ships no chat template: plain "Role: content" turns."""


def _raise_exception(message: str) -> None:
    raise BadRequestError(f"the chat template refused these messages: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise BadRequestError(f"the chat template is not valid Jinja (line {exc.lineno}): {exc.message}; "
                              "fix chat_template in tokenizer_config.json") from exc


def render_chat(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                special_tokens: dict[str, str] | None = None, **extra: Any) -> str:
    """Render ``messages`` (OpenAI-style dicts) through ``template``."""
    from jinja2.exceptions import SecurityError, TemplateError

    _check_messages(messages)
    compiled = _compile(template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **(special_tokens or {}), **extra)
    except SecurityError as exc:
        raise BadRequestError(f"the chat template tried an unsafe operation and was refused: {exc}") from exc
    except TemplateError as exc:
        raise BadRequestError(f"the chat template failed to render: {exc}") from exc


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise BadRequestError(f"messages[{index}] must be an object with a 'role' "
                                  f"(system, user, assistant or tool), got {message!r}")
