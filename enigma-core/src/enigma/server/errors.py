"""Errors as OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the API reports has this shape and the matching HTTP status,
so the openai SDK raises its usual exception types (``BadRequestError``,
``NotFoundError``, ``AuthenticationError``, ``RateLimitError``...).
"""

from __future__ import annotations

import json
from typing import Any

from enigma.errors import BadRequestError, EnigmaError, NotAvailableError, NotFoundError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error answered with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def sse(self) -> bytes:
        """The error as a server-sent event, for failures after a stream has begun."""
        return f"data: {json.dumps(self.body())}\n\n".encode()


def from_exception(exc: BaseException) -> APIError:
    """The API error for any exception raised while serving a request."""
    from enigma.engine.async_engine import EngineDeadError

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, NotFoundError):
        return APIError(404, str(exc), code="model_not_found" if "model" in str(exc) else "not_found")
    if isinstance(exc, BadRequestError):
        return APIError(400, str(exc), param=_field_named(str(exc)))
    if isinstance(exc, NotAvailableError):
        return APIError(400, str(exc))
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_dead")
    if isinstance(exc, EnigmaError):
        return APIError(400, str(exc))
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}")


def _field_named(message: str) -> str | None:
    """The field a SamplingParams message starts with ("temperature = -1 is invalid...")."""
    head = message.split(" ", 1)[0]
    return head if head.isidentifier() and " = " in message[: len(head) + 3] else None
