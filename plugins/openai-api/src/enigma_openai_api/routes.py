"""The OpenAI routes: chat completions, completions, embeddings, models."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from enigma.server import (
    APIError,
    Prepared,
    ServedModel,
    ServerContext,
    charge_tokens,
    from_exception,
    prepare_chat,
    prepare_completion,
    start,
)
from enigma.server.openai_fields import (
    DETOKENIZE_FIELDS,
    EMBEDDING_FIELDS,
    TOKENIZE_FIELDS,
    check_fields,
    check_messages,
    read_json,
)
from enigma.server.tool_calls import StreamedText, Tools, parse_answer

DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


class OpenAITransport:
    """Contributes the /v1 routes (and their OpenAPI description)."""

    def openapi(self) -> dict[str, Any]:
        from enigma_openai_api.openapi import openapi_components, openapi_paths

        return {"paths": openapi_paths(), "components": {"schemas": openapi_components()}}

    def routes(self, context: ServerContext) -> list[Any]:
        from starlette.routing import Route

        api = OpenAIRoutes(context)
        return [
            Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
            Route("/v1/completions", api.completions, methods=["POST"]),
            Route("/v1/embeddings", api.embeddings, methods=["POST"]),
            Route("/v1/models", api.list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", api.get_model, methods=["GET"]),
            # vLLM's tokenizer endpoints, at the root as vLLM serves them (lm-eval's remote tokenizer uses them)
            Route("/tokenize", api.tokenize, methods=["POST"]),
            Route("/detokenize", api.detokenize, methods=["POST"]),
            Route("/tokenizer_info", api.tokenizer_info, methods=["GET"]),
        ]


class OpenAIRoutes:
    def __init__(self, context: ServerContext) -> None:
        self.context = context

    # ------------------------------------------------------------ models

    def _model_card(self, served: ServedModel) -> dict[str, Any]:
        return {"id": served.name, "object": "model", "created": served.created, "owned_by": "enigma",
                "max_model_len": served.max_model_len}

    async def list_models(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list",
                             "data": [self._model_card(m) for m in self.context.models.values()]})

    async def get_model(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse(self._model_card(self.context.model(request.path_params["model_id"])))

    # ------------------------------------------------------------ generation

    async def _first(self, prepared: Prepared, index: int, request_id: str) -> tuple[Any, AsyncIterator[Any]]:
        """Start prompt ``index``; the first output (or error) arrives before any response header is sent."""
        stream = start(prepared, index, request_id)
        try:
            first = await anext(stream)
        except BaseException:
            await stream.aclose()
            raise
        return first, stream

    async def chat_completions(self, request: Any) -> Any:
        body = await read_json(request)
        prepared = prepare_chat(self.context, body, tenant=_tenant(request), transport="openai-api",
                                headers=_headers(request))
        served, (_, token_ids), params, logprobs = prepared.served, prepared.prompts[0], prepared.params[0], \
            prepared.logprobs
        headers = prepared.request.response_headers
        tokenizer = served.llm.tokenizer
        charge = _charger(request)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        first, stream = await self._first(prepared, 0, request_id)
        charge(len(token_ids))
        created = int(time.time())
        base = {"id": request_id, "created": created, "model": served.name}
        fields = prepared.request.response_fields
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return self._stream(self._chat_events(base, params.n, first, stream, len(token_ids), include_usage,
                                                  tokenizer, logprobs or 0, charge, fields, prepared.tools),
                                headers)
        choices, completion_tokens = await _collect(first, stream, params.n, charge)
        return _json({**fields, **base, "object": "chat.completion", "system_fingerprint": None, "choices": [
            {"index": index, **_chat_message(choice["text"], choice["finish_reason"], prepared.tools),
             "logprobs": _chat_logprobs(choice["logprobs"], choice["token_ids"], tokenizer, logprobs)
             if logprobs is not None else None} for index, choice in enumerate(choices)],
            "usage": _usage(len(token_ids), completion_tokens)}, headers)

    async def _chat_events(self, base: dict[str, Any], n: int, first: Any, stream: AsyncIterator[Any],
                           prompt_tokens: int, include_usage: bool, tokenizer: Any,
                           top_logprobs: int, charge: Callable[[int], None],
                           fields: dict[str, Any], tools: Tools | None) -> AsyncIterator[bytes]:
        chunk = {**base, "object": "chat.completion.chunk", "system_fingerprint": None}
        completion_tokens = 0
        streamed = {index: StreamedText(tools.format) for index in range(n)} if tools is not None else {}
        for index in range(n):
            yield sse({**(fields if index == 0 else {}), **chunk, "choices": [{
                "index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}]})
        async for output in _chain(first, stream, charge):
            for completion in output.outputs:
                completion_tokens += len(completion.token_ids)
                if not (completion.text or completion.finish_reason or completion.token_ids):
                    continue
                logprobs = (_chat_logprobs(completion.logprobs, completion.token_ids, tokenizer, top_logprobs)
                            if completion.logprobs is not None else None)
                text, finish = completion.text, completion.finish_reason
                if tools is not None:  # content up to a tool call streams; the calls come whole at the end
                    text = streamed[completion.index].add(text)
                    if finish:
                        _, calls = parse_answer(streamed[completion.index].text, tools)
                        text += streamed[completion.index].rest(bool(calls))
                        if calls:
                            if text:
                                yield sse({**chunk, "choices": [{"index": completion.index, "delta": {
                                    "content": text}, "logprobs": logprobs, "finish_reason": None}]})
                                text, logprobs = "", None
                            yield sse({**chunk, "choices": [{"index": completion.index, "delta": {"tool_calls": [
                                {"index": position, **call} for position, call in enumerate(calls)]},
                                "logprobs": None, "finish_reason": None}]})
                            finish = "tool_calls"
                yield sse({**chunk, "choices": [{
                    "index": completion.index, "delta": {"content": text} if text else {},
                    "logprobs": logprobs, "finish_reason": finish}]})
        if include_usage:
            yield sse({**chunk, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})

    async def completions(self, request: Any) -> Any:
        body = await read_json(request)
        prepared = prepare_completion(self.context, body, tenant=_tenant(request), transport="openai-api",
                                      headers=_headers(request))
        served, encoded, params_list, logprobs = prepared.served, prepared.prompts, prepared.params, prepared.logprobs
        headers = prepared.request.response_headers
        tokenizer = served.llm.tokenizer
        charge = _charger(request)
        charge(sum(len(ids) for _, ids in encoded))
        echo = bool(body.get("echo"))
        request_id = f"cmpl-{uuid.uuid4().hex}"
        if body.get("stream") and len(encoded) > 1:
            raise APIError(400, "streaming supports one prompt per request", param="prompt")
        created = int(time.time())
        base = {"id": request_id, "object": "text_completion", "created": created, "model": served.name}
        if body.get("stream"):
            text, ids = encoded[0]
            first, stream = await self._first(prepared, 0, request_id)
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            echoed = _Echo(text, ids, first, tokenizer, logprobs) if echo else None
            return self._stream(self._completion_events(base, first, stream, len(ids), include_usage, echoed,
                                                        prepared.score_only, tokenizer, charge,
                                                        prepared.request.response_fields), headers)
        starts = [await self._first(prepared, index, f"{request_id}-{index}") for index in range(len(encoded))]
        results = await asyncio.gather(*(_collect(first, stream, params.n, charge)
                                         for (first, stream), params in zip(starts, params_list)))
        choices, completion_tokens = [], 0
        for (text, ids), (first, _), (collected, _count) in zip(encoded, starts, results):
            echoed = _Echo(text, ids, first, tokenizer, logprobs) if echo else None
            for choice in collected:
                generated = "" if prepared.score_only else choice["text"]
                entry = {"index": len(choices), "text": (echoed.text if echoed else "") + generated, "logprobs": None,
                         "finish_reason": "length" if prepared.score_only else choice["finish_reason"]}
                if logprobs is not None:
                    own = {} if prepared.score_only else _completion_logprobs(
                        choice["logprobs"], choice["token_ids"], tokenizer, start=echoed.end if echoed else 0)
                    entry["logprobs"] = _join_logprobs(echoed.logprobs if echoed else None, own)
                completion_tokens += 0 if prepared.score_only else len(choice["token_ids"])
                choices.append(entry)
        prompt_tokens = sum(len(ids) for _, ids in encoded)
        return _json({**prepared.request.response_fields, **base, "choices": choices,
                      "usage": _usage(prompt_tokens, completion_tokens)}, headers)

    async def _completion_events(self, base: dict[str, Any], first: Any, stream: AsyncIterator[Any],
                                 prompt_tokens: int, include_usage: bool, echoed: _Echo | None, score_only: bool,
                                 tokenizer: Any, charge: Callable[[int], None],
                                 fields: dict[str, Any]) -> AsyncIterator[bytes]:
        completion_tokens = 0
        offset = echoed.end if echoed else 0
        if fields:  # the hooks' fields come first, in a chunk of their own
            yield sse({**fields, **base, "choices": []})
        if echoed is not None and echoed.text:
            yield sse({**base, "choices": [{"index": 0, "text": echoed.text, "logprobs": echoed.logprobs,
                                            "finish_reason": None}]})
        async for output in _chain(first, stream, charge):
            for completion in output.outputs:
                if score_only:  # the one sampled token is not part of the answer
                    if completion.finish_reason:
                        yield sse({**base, "choices": [{"index": completion.index, "text": "", "logprobs": None,
                                                        "finish_reason": "length"}]})
                    continue
                completion_tokens += len(completion.token_ids)
                if not (completion.text or completion.finish_reason):
                    continue
                logprobs = None
                if completion.logprobs is not None:
                    logprobs = _completion_logprobs(completion.logprobs, completion.token_ids, tokenizer, start=offset)
                    offset += sum(len(token) for token in logprobs["tokens"])
                yield sse({**base, "choices": [{
                    "index": completion.index, "text": completion.text, "logprobs": logprobs,
                    "finish_reason": completion.finish_reason}]})
        if include_usage:
            yield sse({**base, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})

    def _stream(self, events: AsyncIterator[bytes], headers: dict[str, str]) -> Any:
        from starlette.responses import StreamingResponse

        async def guarded() -> AsyncIterator[bytes]:
            try:
                async for event in events:
                    yield event
            except Exception as exc:  # mid-stream failure: the error object as an event, then [DONE]
                yield from_exception(exc).sse()
            yield DONE

        return StreamingResponse(guarded(), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------ tokenizer

    def _tokenizer_model(self, name: Any) -> ServedModel:
        """The named model, or the only one served when the request names none."""
        if name is None and len(self.context.models) == 1:
            return next(iter(self.context.models.values()))
        if name is None:
            raise APIError(400, "'model' is required when several models are served "
                                f"({', '.join(self.context.models)})", param="model")
        return self.context.model(name)

    async def tokenize(self, request: Any) -> Any:
        """``{"prompt": text}`` or ``{"messages": [...]}`` -> ``{"tokens", "count", "max_model_len"}`` (vLLM's)."""
        body = await read_json(request)
        check_fields(body, TOKENIZE_FIELDS)
        served = self._tokenizer_model(body.get("model"))
        tokenizer = served.llm.tokenizer
        if (body.get("prompt") is None) == (body.get("messages") is None):
            raise APIError(400, "give exactly one of 'prompt' (text) and 'messages' (a chat)", param="prompt")
        if body.get("messages") is not None:
            text = tokenizer.apply_chat_template(check_messages(body["messages"]), chat_template=served.template,
                                                 add_generation_prompt=body.get("add_generation_prompt", True))
            tokens = tokenizer.encode(text, add_special_tokens=bool(body.get("add_special_tokens", False)))
        else:
            if not isinstance(body["prompt"], str):
                raise APIError(400, "'prompt' must be a string", param="prompt")
            tokens = tokenizer.encode(body["prompt"], add_special_tokens=bool(body.get("add_special_tokens", True)))
        return _json({"count": len(tokens), "max_model_len": served.max_model_len, "tokens": tokens})

    async def detokenize(self, request: Any) -> Any:
        """``{"tokens": [ids]}`` -> ``{"prompt": text}`` (vLLM's shape)."""
        body = await read_json(request)
        check_fields(body, DETOKENIZE_FIELDS)
        served = self._tokenizer_model(body.get("model"))
        tokens = body.get("tokens")
        vocab = served.llm.loaded.hf_config.get("vocab_size", 0)
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                   for t in tokens):
            raise APIError(400, f"'tokens' must be a list of token ids in [0, {vocab})", param="tokens")
        return _json({"prompt": served.llm.tokenizer.decode(tokens, skip_special_tokens=False)})

    async def tokenizer_info(self, request: Any) -> Any:
        """The tokenizer's special tokens, chat template and context length (vLLM's ``/tokenizer_info``)."""
        served = self._tokenizer_model(request.query_params.get("model"))
        tokenizer = served.llm.tokenizer
        special = tokenizer.special_tokens
        return _json({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": special.get("eos_token"),
                      "bos_token": special.get("bos_token"), "pad_token": special.get("pad_token"),
                      "unk_token": special.get("unk_token"),
                      "chat_template": served.template or tokenizer.chat_template,
                      "model_max_length": served.max_model_len, "vocab_size": tokenizer.vocab_size})

    # ------------------------------------------------------------ embeddings

    async def embeddings(self, request: Any) -> Any:
        body = await read_json(request)
        check_fields(body, EMBEDDING_FIELDS)
        served = self.context.model(body.get("model"))
        if not served.is_embedding_model:
            raise APIError(400, f"model {served.name!r} generates text; embeddings need an embedding model",
                           param="model", code="wrong_model_kind")
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise APIError(400, "'input' must be a string or a non-empty list of strings (token-id input is "
                                "not supported)", param="input")
        if any(not text for text in texts):
            raise APIError(400, "'input' must not contain empty strings", param="input")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise APIError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
        tokenizer = served.llm.tokenizer
        lengths = [len(tokenizer.encode(text)) for text in texts]
        if max(lengths) > served.max_model_len:
            index = lengths.index(max(lengths))
            raise APIError(400, f"input[{index}] has {lengths[index]} tokens; this model embeds at most "
                                f"{served.max_model_len}", param="input", code="context_length_exceeded")

        def embed() -> list[Any]:
            with served.embed_lock:
                return served.llm.embed(texts)

        outputs = await asyncio.to_thread(embed)
        if body.get("dimensions") is not None and body["dimensions"] != len(outputs[0].outputs.embedding):
            raise APIError(400, f"'dimensions' must be {len(outputs[0].outputs.embedding)} for this model "
                                "(it cannot shorten its embeddings)", param="dimensions")
        data = []
        for index, output in enumerate(outputs):
            vector = output.outputs.embedding
            value: Any = vector
            if encoding == "base64":
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": value})
        tokens = sum(lengths)
        return _json({"object": "list", "data": data, "model": served.name,
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


# ---------------------------------------------------------------- helpers


def _charger(request: Any) -> Callable[[int], None]:
    state = request.scope.get("state") or {}
    return lambda tokens: charge_tokens(state, tokens)


def _json(payload: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(payload, headers=headers)


def _tenant(request: Any) -> str | None:
    return (request.scope.get("state") or {}).get("api_key")


def _headers(request: Any) -> dict[str, str]:
    """The request's headers for the hooks, without the API key (``tenant`` names the caller)."""
    return {name.lower(): value for name, value in request.headers.items() if name.lower() != "authorization"}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _chain(first: Any, stream: AsyncIterator[Any], charge: Callable[[int], None]) -> AsyncIterator[Any]:
    """All outputs, each one's new tokens charged to the caller's tokens/min budget."""
    try:
        output = first
        while True:
            charge(sum(len(c.token_ids) for c in output.outputs))
            yield output
            if output.finished:
                break
            output = await anext(stream)
    except StopAsyncIteration:
        pass
    finally:
        await stream.aclose()  # a client gone mid-stream: the engine aborts the request


async def _collect(first: Any, stream: AsyncIterator[Any], n: int,
                   charge: Callable[[int], None]) -> tuple[list[dict[str, Any]], int]:
    choices = [{"text": "", "token_ids": [], "logprobs": [], "finish_reason": None} for _ in range(n)]
    async for output in _chain(first, stream, charge):
        for completion in output.outputs:
            choice = choices[completion.index]
            choice["text"] += completion.text
            choice["token_ids"] += completion.token_ids
            if completion.logprobs is not None:
                choice["logprobs"] += completion.logprobs
            if completion.finish_reason:
                choice["finish_reason"] = completion.finish_reason
    return choices, sum(len(c["token_ids"]) for c in choices)


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _chat_message(text: str, finish_reason: str | None, tools: Tools | None) -> dict[str, Any]:
    """A whole choice's ``message`` and ``finish_reason``: with tools, its calls read back as
    ``tool_calls`` (``finish_reason`` ``tool_calls``)."""
    if tools is not None:
        content, calls = parse_answer(text, tools)
        if calls:
            return {"message": {"role": "assistant", "content": content, "tool_calls": calls},
                    "finish_reason": "tool_calls"}
    return {"message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}


def _chat_logprobs(entries: list[dict[int, Any]], token_ids: list[int], tokenizer: Any, k: int) -> dict[str, Any]:
    content = []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry[token_id]
        top = sorted(entry.items(), key=lambda item: item[1].rank or 0)[:k]
        content.append({
            "token": _token_text(tokenizer, token_id), "logprob": chosen.logprob,
            "bytes": list(_token_text(tokenizer, token_id).encode()),
            "top_logprobs": [{"token": _token_text(tokenizer, t), "logprob": lp.logprob,
                              "bytes": list(_token_text(tokenizer, t).encode())}
                             for t, lp in top],
        })
    return {"content": content}


class _Echo:
    """The prompt of an ``echo`` completion: its text, and (when logprobs are asked) a logprob per prompt
    token from the engine's prompt logprobs — ``None`` for the first, which nothing predicts, as vLLM gives."""

    def __init__(self, text: str | None, ids: list[int], first: Any, tokenizer: Any, logprobs: int | None) -> None:
        self.text = text if text is not None else tokenizer.decode(ids)
        self.logprobs: dict[str, Any] | None = None
        self.end = len(self.text)
        """Where the generated tokens' ``text_offset``s start: after the prompt's token texts."""
        if logprobs is not None:
            scored = first.prompt_logprobs or [None]
            tokens = [_token_text(tokenizer, token_id) for token_id in ids]
            self.logprobs = {
                "tokens": tokens,
                "token_logprobs": [None] + [entry[token_id].logprob for token_id, entry in zip(ids[1:], scored[1:])],
                "top_logprobs": [None] + [{_token_text(tokenizer, t): lp.logprob for t, lp in entry.items()}
                                          for entry in scored[1:]],
                "text_offset": _offsets(tokens, 0),
            }
            self.end = sum(len(token) for token in tokens)


def _offsets(tokens: list[str], start: int) -> list[int]:
    offsets, offset = [], start
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return offsets


def _join_logprobs(echoed: dict[str, Any] | None, own: dict[str, Any]) -> dict[str, Any]:
    """The prompt's logprobs (if echoed) followed by the generated tokens'."""
    if echoed is None:
        return own
    return {key: echoed[key] + own.get(key, []) for key in echoed}


def _completion_logprobs(entries: list[dict[int, Any]], token_ids: list[int], tokenizer: Any, *,
                         start: int = 0) -> dict[str, Any]:
    pairs = list(zip(token_ids, entries))
    tokens = [_token_text(tokenizer, token_id) for token_id, _ in pairs]
    return {"tokens": tokens, "token_logprobs": [entry[token_id].logprob for token_id, entry in pairs],
            "top_logprobs": [{_token_text(tokenizer, t): lp.logprob for t, lp in entry.items()} for _, entry in pairs],
            "text_offset": _offsets(tokens, start)}
