"""From an OpenAI request body to what the engine runs: model, prompt tokens, SamplingParams.

Shared by every transport that speaks OpenAI's request fields (HTTP here,
WebSocket in the ws plugin), so they accept and refuse exactly the same things.
"""

from __future__ import annotations

from typing import Any

from enigma.errors import BadRequestError
from enigma.server.context import ServedModel, ServerContext
from enigma.server.errors import APIError, from_exception
from enigma_openai_api.validation import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    check_fields,
    check_messages,
    check_prompt,
    check_stop,
)


def generator_model(context: ServerContext, body: dict[str, Any]) -> ServedModel:
    served = context.model(body.get("model"))
    if served.is_embedding_model:
        raise APIError(400, f"model {served.name!r} is an embedding model; use POST /v1/embeddings",
                       param="model", code="wrong_model_kind")
    return served


def prepare_chat(context: ServerContext, body: dict[str, Any]) -> tuple[ServedModel, str, list[int], Any, int | None]:
    """``(model, prompt text, prompt token ids, SamplingParams, top_logprobs or None)`` of a chat request."""
    check_fields(body, CHAT_FIELDS)
    served = generator_model(context, body)
    messages = check_messages(body.get("messages"))
    if served.system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": served.system})
    tokenizer = served.llm.tokenizer
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=served.template)
    except BadRequestError as exc:
        raise APIError(400, str(exc), param="messages") from None
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    logprobs = None
    if body.get("logprobs"):
        logprobs = body.get("top_logprobs") or 0
        if not 0 <= logprobs <= 20:
            raise APIError(400, "'top_logprobs' must be between 0 and 20", param="top_logprobs")
    elif body.get("top_logprobs") is not None:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    params = sampling_params(body, served, len(token_ids), where="messages", logprobs=logprobs)
    return served, text, token_ids, params, logprobs


def prepare_completion(context: ServerContext, body: dict[str, Any]
                       ) -> tuple[ServedModel, list[tuple[str | None, list[int]]], list[Any], int | None]:
    """``(model, [(prompt text or None, token ids)], [SamplingParams per prompt], logprobs)``."""
    check_fields(body, COMPLETION_FIELDS)
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
    params = [sampling_params(body, served, len(ids), where="prompt", logprobs=logprobs) for _, ids in encoded]
    return served, encoded, params, logprobs


def sampling_params(body: dict[str, Any], served: ServedModel, prompt_tokens: int, *, where: str,
                    logprobs: int | None) -> Any:
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
    try:
        return SamplingParams(**values)
    except BadRequestError as exc:
        raise from_exception(exc) from None
