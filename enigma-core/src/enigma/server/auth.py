"""API-key authentication and token-bucket rate limits, for every transport.

Pure ASGI middleware: it sees HTTP and WebSocket connections alike. A key
comes as ``Authorization: Bearer <key>`` or, for browsers' WebSockets,
``?api_key=<key>``. Health routes stay public, and the paths transports
declare public (``Transport.public_paths()``, e.g. prometheus's
``/metrics``). A 401 says only that the key is missing or wrong, never
whether a key of that name exists.
"""

from __future__ import annotations

import json
import math
import threading
import time
from typing import Any
from urllib.parse import parse_qs

from enigma.server.errors import APIError
from enigma.server.keys import KeyStore

PUBLIC_PATHS = ("/health", "/health/ready", "/health/full")


class TokenBucket:
    """``rate`` units per minute, bursting up to ``rate``: requests, or model tokens."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.updated = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.updated) * self.rate / 60)
        self.updated = now

    def take(self) -> float:
        """0 if a request may go now (and count it), else the seconds until it may."""
        self._refill()
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) * 60 / self.rate

    def overdrawn(self) -> float:
        """0 while the budget is not negative, else the seconds until it is not."""
        self._refill()
        return 0.0 if self.tokens >= 0 else -self.tokens * 60 / self.rate

    def spend(self, amount: int) -> None:
        """Charge ``amount`` after the fact (the next request waits if it went negative)."""
        self._refill()
        self.tokens -= amount


class RateLimiter:
    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._lock = threading.Lock()

    def _bucket(self, kind: str, who: str, rate: int) -> TokenBucket:
        bucket = self._buckets.get((kind, who))
        if bucket is None or bucket.rate != rate:
            bucket = self._buckets[(kind, who)] = TokenBucket(rate)
        return bucket

    def check(self, kind: str, who: str, rate: int) -> float:
        """Count one request; the wait in seconds if over ``rate`` per minute."""
        if rate <= 0:
            return 0.0
        with self._lock:
            return self._bucket(kind, who, rate).take()

    def overdrawn(self, kind: str, who: str, rate: int) -> float:
        if rate <= 0:
            return 0.0
        with self._lock:
            return self._bucket(kind, who, rate).overdrawn()

    def spend(self, kind: str, who: str, rate: int, amount: int) -> None:
        if rate > 0 and amount > 0:
            with self._lock:
                self._bucket(kind, who, rate).spend(amount)


class AuthGuard:
    """Checks keys and rate limits before a request reaches any route."""

    def __init__(self, app: Any, *, context: Any) -> None:
        self.app = app
        self.keys = KeyStore(context.keys_path)
        self.auth = context.auth
        self.default_rate = context.rate_limit
        self.ip_rate = context.ip_rate_limit
        self.token_rate = context.token_rate_limit
        self.ip_token_rate = context.ip_token_rate_limit
        self.public = (*PUBLIC_PATHS, *context.public_paths)
        self.limiter = RateLimiter()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("path") in self.public:
            await self.app(scope, receive, send)
            return
        try:
            key_name, rate, token_rate = self._authenticate(scope)
            client = (scope.get("client") or ("unknown", 0))[0]
            wait = self.limiter.check("ip", client, self.ip_rate)
            if not wait and key_name is not None:
                wait = self.limiter.check("key", key_name, rate)
            if wait:
                raise APIError(429, f"Rate limit reached for requests: try again in {wait:.1f}s.",
                               code="rate_limit_exceeded", type="requests",
                               headers={"Retry-After": str(max(1, math.ceil(wait)))})
            wait = max(self.limiter.overdrawn("ip-tokens", client, self.ip_token_rate),
                       self.limiter.overdrawn("key-tokens", key_name or "", token_rate if key_name else 0))
            if wait:
                raise APIError(429, f"Rate limit reached for tokens per minute: try again in {wait:.1f}s.",
                               code="rate_limit_exceeded", type="tokens",
                               headers={"Retry-After": str(max(1, math.ceil(wait)))})
        except APIError as error:
            await _refuse(scope, receive, send, error)
            return

        def charge(tokens: int) -> None:
            self.limiter.spend("ip-tokens", client, self.ip_token_rate, tokens)
            if key_name is not None:
                self.limiter.spend("key-tokens", key_name, token_rate, tokens)

        state = scope.setdefault("state", {})
        state["api_key"] = key_name
        state["charge_tokens"] = charge
        await self.app(scope, receive, send)

    def _authenticate(self, scope: dict) -> tuple[str | None, int, int]:
        if not self.auth or not self.keys.keys():  # on by default as soon as a key exists
            return None, self.default_rate, 0
        headers = dict(scope.get("headers") or [])
        presented = None
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        if authorization.lower().startswith("bearer "):
            presented = authorization[7:].strip()
        elif scope.get("query_string"):
            presented = (parse_qs(scope["query_string"].decode("latin-1")).get("api_key") or [None])[0]
        if not presented:
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' "
                                "(WebSocket: ?api_key=<key>); create one with `enigma keys create NAME`.",
                           code="missing_api_key")
        key = self.keys.verify(presented)
        if key is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return key.name, key.rate_limit or self.default_rate, key.token_limit or self.token_rate


def charge_tokens(scope_state: Any, tokens: int) -> None:
    """Count a finished request's tokens against its key's and address's tokens/min budgets."""
    charge = scope_state.get("charge_tokens") if isinstance(scope_state, dict) else None
    if charge is not None:
        charge(tokens)


async def _refuse(scope: dict, receive: Any, send: Any, error: APIError) -> None:
    if scope["type"] == "websocket":
        await receive()  # the connect message
        if "websocket.http.response" not in (scope.get("extensions") or {}):
            await send({"type": "websocket.close", "code": 1008, "reason": error.message[:120]})
            return
        body = json.dumps(error.body()).encode()
        await send({"type": "websocket.http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "websocket.http.response.body", "body": body})
        return
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
