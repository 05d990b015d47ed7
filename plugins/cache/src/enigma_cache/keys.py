"""Which requests the cache may answer, and the key an answer is kept under."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import attrs

from enigma.errors import BadRequestError

REQUEST_FIELD = ("the response cache for this request: false to skip it, or {ttl: seconds, semantic: bool}")

_NOT_PART_OF_THE_ANSWER = {"stream", "stream_options", "cache", "user"}
"""Body fields that do not change what a request answers (a stream and a body give the same answer)."""


@attrs.frozen
class Decision:
    """What the cache does with one request."""

    lookup: bool
    """Answer from the cache if it has the answer."""
    store: bool
    """Keep the answer the model gives."""
    reason: str = ""
    """Why not (both false): sampled, logprobs, opted-out, no-store."""
    key: str = ""
    semantic_space: str = ""
    """Requests whose answers are interchangeable when their prompts mean the same: same model, tenant and
    options, only the prompt differs."""
    semantic: bool = False
    ttl: float | None = None


def decide(request: Any, *, ttl: float, semantic: bool) -> Decision:
    """The cache's decision for a :class:`enigma.server.GenerationRequest`."""
    option = request.body.get("cache")
    if option is not None and not isinstance(option, bool | dict):
        raise BadRequestError(f"'cache' must be true, false or an object {{ttl, semantic}}; got {option!r}")
    if isinstance(option, dict):
        unknown = set(option) - {"ttl", "semantic"}
        if unknown:
            raise BadRequestError(f"'cache' takes ttl and semantic; unknown: {', '.join(sorted(unknown))}")
        if "ttl" in option:
            value = option["ttl"]
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise BadRequestError(f"'cache.ttl' must be a positive number of seconds; got {value!r}")
            ttl = float(value)
        if "semantic" in option:
            if not isinstance(option["semantic"], bool):
                raise BadRequestError(f"'cache.semantic' must be true or false; got {option['semantic']!r}")
            semantic = semantic and option["semantic"]
    if option is False:
        return Decision(False, False, "opted-out")
    params = request.params
    if params.logprobs is not None or params.prompt_logprobs is not None:
        return Decision(False, False, "logprobs")
    if not (params.greedy or (params.seed is not None and params.n == 1)):
        return Decision(False, False, "sampled")
    directives = _cache_control(request.headers.get("cache-control", ""))
    if "no-store" in directives:
        return Decision(False, False, "no-store")
    kind = "chat" if request.is_chat else "completion"
    tenant = _digest(request.tenant or "")[:16] if request.tenant else "-"
    options = {k: v for k, v in request.body.items() if k not in _NOT_PART_OF_THE_ANSWER}
    key = f"enigma:resp:{tenant}:{_digest([kind, request.model, options])}"
    without_prompt = {k: v for k, v in options.items() if k not in ("messages", "prompt")}
    space = _digest([kind, request.model, tenant, without_prompt])
    refresh = "no-cache" in directives
    return Decision(lookup=not refresh, store=True, reason="no-cache" if refresh else "", key=key,
                    semantic_space=space, semantic=semantic and not refresh, ttl=ttl)


def tenant_prefix(tenant: str | None) -> str:
    """The key prefix of one tenant's answers (``enigma cache clear --tenant``)."""
    return f"enigma:resp:{_digest(tenant)[:16] if tenant else '-'}:"


def prompt_text(request: Any) -> str | None:
    """The text the semantic cache embeds: a chat's messages, a completion's text prompt (None for ids)."""
    if request.is_chat:
        lines = []
        for message in request.messages:
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
            lines.append(f"{message.get('role')}: {content or ''}")
        return "\n".join(lines)
    return request.prompt if isinstance(request.prompt, str) else None


def _cache_control(header: str) -> set[str]:
    return {part.split("=", 1)[0].strip().lower() for part in header.split(",") if part.strip()}


def _digest(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
