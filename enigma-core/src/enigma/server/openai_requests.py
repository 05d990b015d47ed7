"""From an OpenAI request body to what the engine runs: model, prompt tokens, SamplingParams.

Public and shared by every transport that speaks OpenAI's request fields
(``openai-api`` over HTTP, ``ws`` over WebSocket), so they accept and refuse
exactly the same things. :func:`prepare_chat` and :func:`prepare_completion`
validate a body, build the :class:`~enigma.server.generation.GenerationRequest`,
run the ``enigma_before_generation`` hooks on it, and then template and
tokenize what the hooks left — or carry the answer a hook gave.
:func:`start` begins a prompt's outputs (from the engine, or the answer).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import attrs

from enigma.errors import BadRequestError
from enigma.server.context import ServedModel, ServerContext
from enigma.server.errors import APIError, from_exception
from enigma.server.generation import (
    GenerationAnswer,
    GenerationRequest,
    answer_outputs,
    before_generation,
    observe_outputs,
    plugin_request_fields,
)
from enigma.server.openai_fields import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    check_fields,
    check_messages,
    check_prompt,
    check_stop,
)
from enigma.server.tool_calls import (
    OPEN,
    Tools,
    auto_grammar,
    prepare_messages,
    read_tools,
    template_renders_tools,
    tool_format,
    tool_grammar,
)


def generator_model(context: ServerContext, body: dict[str, Any]) -> ServedModel:
    served = context.model(body.get("model"))
    if served.is_embedding_model:
        raise APIError(400, f"model {served.name!r} is an embedding model; use POST /v1/embeddings",
                       param="model", code="wrong_model_kind")
    return served


@attrs.frozen(kw_only=True)
class Prepared:
    """A validated request, after the before-generation hooks: what to run (or the answer)."""

    served: ServedModel
    request: GenerationRequest
    """The request as the hooks left it (``request.response_headers`` go on the response)."""
    prompts: list[tuple[str | None, list[int]]]
    """Each prompt's text (None for token ids) and token ids: one for a chat."""
    params: list[Any]
    """Each prompt's SamplingParams."""
    logprobs: int | None
    """``top_logprobs`` (chat) or ``logprobs`` (completion) asked for, else None."""
    answer: GenerationAnswer | None = None
    """A hook's answer: send it instead of generating."""
    score_only: bool = False
    """``max_tokens: 0`` with ``echo``: the prompt is scored, nothing is generated (one token is
    sampled and dropped)."""
    tools: Tools | None = None
    """A chat's tools (``tool_choice`` not ``none``): its answers are read back as ``tool_calls``."""


def _plugin_fields() -> dict[str, tuple[Any, str]]:
    """Fields plugins read, as :func:`check_fields` takes them (any JSON value: the plugin checks it)."""
    return {name: (object, description) for name, description in plugin_request_fields().items()}


def prepare_chat(context: ServerContext, body: dict[str, Any], *, tenant: str | None = None,
                 transport: str = "", headers: dict[str, str] | None = None) -> Prepared:
    """Validate a chat request, run the before-generation hooks, template and tokenize the result."""
    check_fields(body, {**CHAT_FIELDS, **_plugin_fields()})
    served = generator_model(context, body)
    messages = check_messages(body.get("messages"))
    if served.system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": served.system})
    logprobs = None
    if body.get("logprobs"):
        logprobs = body.get("top_logprobs") or 0
        if not 0 <= logprobs <= 20:
            raise APIError(400, "'top_logprobs' must be between 0 and 20", param="top_logprobs")
    elif body.get("top_logprobs") is not None:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    tokenizer = served.llm.tokenizer
    template = served.template or tokenizer.chat_template or ""
    tools = read_tools(body, format=tool_format(template, context.tool_parser))
    guided = None
    if tools is not None and tools.constrained:
        if guided_decoding(body) is not None:
            raise APIError(400, "a required or named 'tool_choice' fixes the answer's shape; it cannot be "
                                "combined with 'response_format' or guided decoding", param="tool_choice")
        from enigma.guided import GuidedDecodingParams

        guided = GuidedDecodingParams(grammar=tool_grammar(tools))
    elif tools is not None and guided_decoding(body) is None:
        lazy = auto_grammar(tools, trigger_is_special=tokenizer.token_to_id(OPEN) in tokenizer.all_special_ids)
        if lazy is not None:
            from enigma.guided import GuidedDecodingParams

            guided = GuidedDecodingParams(grammar=lazy)
    text, token_ids = _template(tokenizer, served, messages, tools)
    params = sampling_params(body, served, len(token_ids), where="messages", logprobs=logprobs, guided=guided)
    request = GenerationRequest(model=served.name, messages=tuple(messages), tenant=tenant, transport=transport,
                                body=body, headers=dict(headers or {}), params=params)
    result = _run_hooks(request)
    if isinstance(result, GenerationAnswer):
        return Prepared(served=served, request=_answered(request, result), prompts=[(text, token_ids)],
                        params=[params], logprobs=logprobs, answer=result, tools=tools)
    if result.messages != request.messages:  # a hook rewrote the conversation
        text, token_ids = _template(tokenizer, served, list(result.messages), tools)
        params = sampling_params(body, served, len(token_ids), where="messages", logprobs=logprobs, guided=guided)
        result = attrs.evolve(result, params=params)
    return Prepared(served=served, request=result, prompts=[(text, token_ids)], params=[params], logprobs=logprobs,
                    tools=tools)


def _template(tokenizer: Any, served: ServedModel, messages: list[dict[str, Any]],
              tools: Tools | None = None) -> tuple[str, list[int]]:
    template = served.template or tokenizer.chat_template or ""
    native = template_renders_tools(template)
    extra = {"tools": tools.as_openai()} if tools is not None and native else {}
    try:
        text = tokenizer.apply_chat_template(prepare_messages(messages, tools, native=native),
                                             chat_template=served.template, **extra)
    except BadRequestError as exc:
        raise APIError(400, str(exc), param="messages") from None
    return text, tokenizer.encode(text, add_special_tokens=False)


def prepare_completion(context: ServerContext, body: dict[str, Any], *, tenant: str | None = None,
                       transport: str = "", headers: dict[str, str] | None = None) -> Prepared:
    """Validate a completion request (one or several prompts) and run the before-generation hooks.

    The hooks act on one prompt: a request with several prompts (a batch) runs
    without them, as generated text only."""
    check_fields(body, {**COMPLETION_FIELDS, **_plugin_fields()})
    served = generator_model(context, body)
    prompts = check_prompt(body.get("prompt"))
    tokenizer = served.llm.tokenizer
    encoded = [(p, tokenizer.encode(p)) if isinstance(p, str) else (None, p) for p in prompts]
    vocab = served.llm.loaded.hf_config.get("vocab_size", 0)
    for _, ids in encoded:
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"'prompt' token ids must be in [0, {vocab})", param="prompt")
    logprobs = body.get("logprobs")
    if logprobs is not None and not 0 <= logprobs <= 5:
        raise APIError(400, "'logprobs' must be between 0 and 5 for completions", param="logprobs")
    echo = bool(body.get("echo"))
    score_only = echo and body.get("max_tokens") == 0
    if body.get("max_tokens") == 0 and not echo:
        raise APIError(400, "'max_tokens' 0 generates nothing; it scores the prompt only with 'echo': true",
                       param="max_tokens")
    scoring = {**body, "max_tokens": 1} if score_only else body
    # echo with logprobs scores the prompt too: a logprob per prompt token (the first has none), as vLLM gives
    prompt_logprobs = logprobs if echo and logprobs is not None else None
    params = [sampling_params(scoring, served, len(ids), where="prompt", logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs) for _, ids in encoded]
    if len(encoded) != 1:  # hooks act on single prompts
        request = GenerationRequest(model=served.name, tenant=tenant, transport=transport, body=body,
                                    headers=dict(headers or {}), params=params[0])
        return Prepared(served=served, request=request, prompts=encoded, params=params, logprobs=logprobs,
                        score_only=score_only)
    text, ids = encoded[0]
    request = GenerationRequest(model=served.name, prompt=text if text is not None else tuple(ids), tenant=tenant,
                                transport=transport, body=body, headers=dict(headers or {}), params=params[0])
    result = _run_hooks(request)
    if isinstance(result, GenerationAnswer):
        return Prepared(served=served, request=_answered(request, result), prompts=encoded, params=params,
                        logprobs=logprobs, answer=result, score_only=score_only)
    if result.prompt != request.prompt:
        text, ids = (result.prompt, tokenizer.encode(result.prompt)) if isinstance(result.prompt, str) \
            else (None, list(result.prompt))
        params = [sampling_params(scoring, served, len(ids), where="prompt", logprobs=logprobs,
                                  prompt_logprobs=prompt_logprobs)]
        result = attrs.evolve(result, params=params[0])
    return Prepared(served=served, request=result, prompts=[(text, ids)], params=params, logprobs=logprobs,
                    score_only=score_only)


def _answered(request: GenerationRequest, answer: GenerationAnswer) -> GenerationRequest:
    """The request as answered: the answer's response headers and fields added to the request's."""
    return attrs.evolve(request, response_headers={**request.response_headers, **answer.response_headers},
                        response_fields={**request.response_fields, **answer.response_fields})


def _run_hooks(request: GenerationRequest) -> GenerationRequest | GenerationAnswer:
    try:
        return before_generation(request)
    except BadRequestError as exc:
        raise from_exception(exc) from None


def start(prepared: Prepared, index: int, request_id: str) -> AsyncIterator[Any]:
    """Prompt ``index``'s outputs: the engine's stream (observed, for ``enigma_generation_finished``),
    or the hook's answer shaped like one."""
    text, token_ids = prepared.prompts[index]
    params = prepared.params[index]
    if prepared.answer is not None:
        return answer_outputs(prepared.answer, request_id=request_id, params=params,
                              tokenizer=prepared.served.llm.tokenizer, prompt=text, prompt_token_ids=token_ids)
    stream = prepared.served.engine.generate(token_ids, params, request_id, prompt_text=text,
                                             adapter=prepared.served.adapter)
    return observe_outputs(stream, prepared.request) if len(prepared.prompts) == 1 else stream


def sampling_params(body: dict[str, Any], served: ServedModel, prompt_tokens: int, *, where: str,
                    logprobs: int | None, prompt_logprobs: int | None = None, guided: Any = None) -> Any:
    """SamplingParams: the model's defaults, then the request's fields; max_tokens checked against the context."""
    from enigma import SamplingParams

    values: dict[str, Any] = dict(served.defaults)
    for key in ("temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                "repetition_penalty", "min_tokens", "ignore_eos"):
        if body.get(key) is not None:
            values[key] = body[key]
    if body.get("stop") is not None:
        values["stop"] = check_stop(body["stop"])
    limit = served.max_model_len
    if prompt_tokens >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your {where} "
                            f"resulted in {prompt_tokens} tokens. Please reduce the length of the {where}.",
                       param=where, code="context_length_exceeded")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    requested = body.get(key)
    if requested is not None:
        if requested < 1:
            raise APIError(400, f"'{key}' must be at least 1, got {requested}", param=key)
        if prompt_tokens + requested > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{prompt_tokens + requested} tokens ({prompt_tokens} in the {where}, "
                                f"{requested} in the completion). Please reduce the length of the {where} "
                                "or completion.", param=key, code="context_length_exceeded")
        values["max_tokens"] = requested
    else:
        values["max_tokens"] = limit - prompt_tokens
    if logprobs is not None:
        values["logprobs"] = logprobs
    if prompt_logprobs is not None:
        values["prompt_logprobs"] = prompt_logprobs
    values["guided_decoding"] = guided if guided is not None else guided_decoding(body)
    try:
        return SamplingParams(**values)
    except BadRequestError as exc:
        raise from_exception(exc) from None


def strict_schema(schema: Any) -> Any:
    """OpenAI's ``strict: true``: objects that do not say otherwise take no properties beyond theirs (strict
    mode requires ``additionalProperties: false``; here it is the default instead of an error)."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {}
    for key, value in schema.items():
        if key in ("const", "enum", "default", "examples"):  # values, not schemas
            result[key] = value
        elif key == "properties" and isinstance(value, dict):
            result[key] = {name: strict_schema(sub) for name, sub in value.items()}
        else:
            result[key] = strict_schema(value)
    if (schema.get("type") == "object" or "properties" in schema) and "additionalProperties" not in schema:
        result["additionalProperties"] = False
    return result


_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}


def guided_decoding(body: dict[str, Any]) -> Any:
    """The request's structured-output ask as :class:`enigma.guided.GuidedDecodingParams`, or None:
    OpenAI's ``response_format``, vLLM's ``guided_*`` fields or its ``structured_outputs`` object — one."""
    from enigma.guided import GuidedDecodingParams

    asked: list[tuple[str, dict[str, Any]]] = []
    response_format = body.get("response_format")
    if response_format is not None:
        kind = response_format.get("type")
        if kind == "json_object":
            asked.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise APIError(400, "'response_format.json_schema' must be an object {name, schema, strict}",
                               param="response_format")
            if not isinstance(spec.get("name"), str) or not spec["name"]:
                raise APIError(400, "'response_format.json_schema.name' is required (a string)",
                               param="response_format")
            schema = spec.get("schema") or {}
            if spec.get("strict"):
                schema = strict_schema(schema)
            asked.append(("response_format", {"json": schema}))
        elif kind != "text":
            raise APIError(400, f"'response_format.type' must be text, json_object or json_schema; got {kind!r}",
                           param="response_format")
    for field, name in _GUIDED_FIELDS.items():
        if body.get(field) is not None:
            asked.append((field, {name: body[field]}))
    outputs = body.get("structured_outputs")
    if outputs is not None:
        known = {"json", "regex", "choice", "grammar", "json_object"}
        unknown = set(outputs) - known
        if unknown:
            raise APIError(400, f"'structured_outputs' takes one of {', '.join(sorted(known))}; unknown: "
                                f"{', '.join(sorted(unknown))}", param="structured_outputs")
        asked.append(("structured_outputs", outputs))
    backend = body.get("guided_decoding_backend")
    if backend not in (None, "auto", "guidance", "llguidance"):
        raise APIError(400, f"'guided_decoding_backend' {backend!r} is not available; this server has "
                            "'guidance' (llguidance)", param="guided_decoding_backend")
    if not asked:
        return None
    if len(asked) > 1:
        raise APIError(400, f"give one structured-output field; got {', '.join(field for field, _ in asked)}",
                       param=asked[1][0])
    field, values = asked[0]
    try:
        return GuidedDecodingParams(**values)
    except BadRequestError as exc:
        raise APIError(400, str(exc), param=field) from None
