"""The request-level hooks: what may happen to a chat or completion request before and after it runs.

Transports turn their wire format into a :class:`GenerationRequest` and call
:func:`before_generation` before templating and tokenizing. Each plugin's
``enigma_before_generation`` hook sees the request as earlier plugins left it
and may return a changed copy (retrieval augments the messages) or a
:class:`GenerationAnswer` (a response cache answers without generating),
which ends the chain. :func:`answer_outputs` turns an answer into the same
``RequestOutput`` stream the engine would give, so transports send it exactly
like generated text — streamed as SSE chunks or as one body. When generation
ends, :func:`generation_finished` tells every ``enigma_generation_finished``
observer the request and its output (a cache stores it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import attrs

from enigma.errors import EnigmaError, PluginError

logger = logging.getLogger("enigma.server")


@attrs.frozen(kw_only=True)
class GenerationRequest:
    """A chat or completion request, validated, before the model's template and tokenizer see it."""

    model: str
    """The served model's name."""
    params: Any
    """Its :class:`enigma.SamplingParams`."""
    messages: tuple[dict[str, Any], ...] | None = None
    """A chat's messages (OpenAI's shape), or None for a completion."""
    prompt: str | tuple[int, ...] | None = None
    """A completion's prompt (text or token ids), or None for a chat."""
    tenant: str | None = None
    """Who asks: the API key's name (None without keys). Keep one tenant's data from another's."""
    transport: str = ""
    """The transport that received it (``openai-api``, ``ws``...)."""
    body: dict[str, Any] = attrs.field(factory=dict)
    """The request as the transport received it (its raw fields, for plugins' own options)."""
    headers: dict[str, str] = attrs.field(factory=dict)
    """The transport's request headers, names lower-cased (HTTP: ``cache-control``), without
    ``authorization``; empty for transports without headers."""
    response_headers: dict[str, str] = attrs.field(factory=dict)
    """Headers the transport adds to its response (HTTP); hooks may set some (``x-enigma-cache``)."""
    response_fields: dict[str, Any] = attrs.field(factory=dict)
    """Fields the transport adds to its response body, JSON values (the RAG plugin's ``sources``):
    top-level fields of a completion object, and of the first chunk of a stream."""

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@attrs.frozen(kw_only=True)
class GenerationAnswer:
    """An answer given without running the model."""

    text: str
    finish_reason: str = "stop"
    answered_by: str = ""
    """The plugin that answered (filled in by :func:`before_generation`)."""
    chunks: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """The answer as a stream sends it: each delta's text and token ids, joining to ``text`` (a cache
    replays a stream chunk for chunk). Empty: one chunk, ``text`` re-encoded."""
    response_headers: dict[str, str] = attrs.field(factory=dict)
    """Headers the transport adds to the response (``x-enigma-cache: hit``)."""
    response_fields: dict[str, Any] = attrs.field(factory=dict)
    """Fields the transport adds to the response body, as :attr:`GenerationRequest.response_fields`."""


def before_generation(request: GenerationRequest, *, host: Any = None) -> GenerationRequest | GenerationAnswer:
    """Run every ``enigma_before_generation`` hook in turn; the request to run, or an answer.

    A hook that raises an :class:`~enigma.errors.EnigmaError` fails the
    request with that error (it is the client's); any other exception is a
    :class:`~enigma.errors.PluginError` naming the plugin.
    """
    host = host or _host()
    for implementation in reversed(host.hook.enigma_before_generation.get_hookimpls()):
        try:
            result = implementation.function(request=request)
        except EnigmaError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {implementation.plugin_name!r} failed in enigma_before_generation: "
                              f"{type(exc).__name__}: {exc}") from exc
        if result is None:
            continue
        if isinstance(result, GenerationAnswer):
            if request.params.logprobs is not None or request.params.prompt_logprobs is not None:
                logger.debug("plugin %r answered a request for logprobs; it runs instead",
                             implementation.plugin_name)
                continue
            return attrs.evolve(result, answered_by=result.answered_by or implementation.plugin_name)
        if not isinstance(result, GenerationRequest):
            raise PluginError(f"plugin {implementation.plugin_name!r}: enigma_before_generation returned "
                              f"{type(result).__name__}; return None, a GenerationRequest or a GenerationAnswer")
        if result.is_chat != request.is_chat:
            raise PluginError(f"plugin {implementation.plugin_name!r}: enigma_before_generation turned a "
                              f"{'chat' if request.is_chat else 'completion'} into the other kind")
        request = result
    return request


def plugin_request_fields(*, host: Any = None) -> dict[str, str]:
    """The body fields plugins read (``enigma_request_fields``): name → what it holds."""
    fields: dict[str, str] = {}
    for result in (host or _host()).broadcast("enigma_request_fields"):
        fields.update(result)
    return fields


def generation_finished(request: GenerationRequest, output: Any,
                        chunks: list[list[tuple[str, list[int]]]] | None = None, *, host: Any = None) -> None:
    """Tell observers a request finished with ``output`` (a finished :class:`enigma.RequestOutput`) and
    ``chunks``, each completion's deltas as streamed (text, token ids)."""
    if chunks is None:
        chunks = [[(c.text, list(c.token_ids))] for c in output.outputs]
    (host or _host()).broadcast("enigma_generation_finished", request=request, output=output, chunks=chunks)


async def answer_outputs(answer: GenerationAnswer, *, request_id: str, params: Any, tokenizer: Any,
                         prompt: str | None, prompt_token_ids: list[int]) -> AsyncIterator[Any]:
    """The engine-shaped stream of an answer: a RequestOutput per chunk (the last one finished), each with
    ``params.n`` equal completions."""
    from enigma.outputs import CompletionOutput, RequestOutput

    chunks = answer.chunks or ((answer.text, tuple(tokenizer.encode(answer.text, add_special_tokens=False))),)
    for number, (text, token_ids) in enumerate(chunks):
        last = number == len(chunks) - 1
        outputs = [CompletionOutput(index=index, text=text, token_ids=list(token_ids), cumulative_logprob=None,
                                    logprobs=None, finish_reason=answer.finish_reason if last else None,
                                    stop_reason=None) for index in range(params.n)]
        yield RequestOutput(request_id=request_id, prompt=prompt, prompt_token_ids=prompt_token_ids,
                            prompt_logprobs=None, outputs=outputs, finished=last)


async def observe_outputs(stream: AsyncIterator[Any], request: GenerationRequest) -> AsyncIterator[Any]:
    """Pass an engine's delta outputs through; with the finished one, tell
    :func:`generation_finished` the whole output (texts and token ids joined)."""
    from enigma.outputs import CompletionOutput, RequestOutput

    chunks: dict[int, list[tuple[str, list[int]]]] = {}
    try:
        async for output in stream:
            for completion in output.outputs:
                if completion.text or completion.token_ids:
                    chunks.setdefault(completion.index, []).append((completion.text, list(completion.token_ids)))
            if output.finished:  # before yielding it: a consumer may stop reading at the last output
                whole = [CompletionOutput(index=c.index, text="".join(text for text, _ in chunks.get(c.index, ())),
                                          token_ids=[t for _, ids in chunks.get(c.index, ()) for t in ids],
                                          finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                         for c in output.outputs]
                generation_finished(request, RequestOutput(
                    request_id=output.request_id, prompt=output.prompt, prompt_token_ids=output.prompt_token_ids,
                    outputs=whole, finished=True), [chunks.get(c.index, []) for c in output.outputs])
            yield output
    finally:
        await stream.aclose()


def _host() -> Any:
    from enigma.plugins import get_host

    return get_host()
