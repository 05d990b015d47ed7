"""The ASGI app: transport plugins' routes, health routes, and core middleware."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from enigma.errors import EnigmaError
from enigma.server.context import ServerContext
from enigma.server.errors import APIError, from_exception

logger = logging.getLogger("enigma.server")


def build_app(context: ServerContext, *, load_models: bool = True) -> Any:
    """The Starlette app serving ``context``: every available transport's routes plus health."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from enigma.plugins import get_host
    from enigma.server.auth import AuthGuard

    registry = get_host().registry
    routes: list[Any] = [
        Route("/health", health, methods=["GET"]),
        Route("/health/ready", health_ready, methods=["GET"]),
        Route("/health/full", health_full, methods=["GET"]),
    ]
    transports = [impl.create() for impl in registry.implementations("transport") if impl.availability()]
    for transport in transports:
        routes.extend(transport.routes(context))
        context.public_paths.extend(getattr(transport, "public_paths", lambda: [])())
    document = openapi_document(transports)

    async def openapi(request: Any) -> JSONResponse:
        return JSONResponse(document)

    routes.append(Route("/openapi.json", openapi, methods=["GET"]))

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        error = from_exception(exc)
        if error.status >= 500:
            logger.exception("request %s failed", request.url.path, exc_info=exc)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        status = getattr(exc, "status_code", 404)
        message = (f"{request.method} {request.url.path} is not a route of this server" if status == 404
                   else f"{request.method} is not allowed on {request.url.path}")
        error = APIError(status, message, code="not_found" if status == 404 else "method_not_allowed")
        return JSONResponse(error.body(), status_code=status)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        import asyncio

        task = asyncio.create_task(context.load_in_background()) if load_models else None
        try:
            yield
        finally:
            context.state = "stopping"
            if task is not None and not task.done():
                await asyncio.wait({task}, timeout=30)
            await asyncio.to_thread(context.close)

    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(RequestGuard, context=context),
            Middleware(AuthGuard, context=context),
        ],
        # EnigmaError and APIError answer in the exception middleware; only other
        # exceptions reach the outermost handler (logged as a 500).
        exception_handlers={APIError: on_error, EnigmaError: on_error, Exception: on_error,
                            404: not_found, 405: not_found},
        lifespan=lifespan,
    )
    app.state.context = context
    wrapped: Any = app
    for implementation in reversed(get_host().hook.enigma_asgi_wrapper.get_hookimpls()):
        try:
            result = implementation.function(**{arg: {"app": wrapped, "context": context}[arg]
                                                 for arg in implementation.argnames})
        except Exception as exc:
            from enigma.errors import PluginError

            raise PluginError(f"plugin {implementation.plugin_name!r} failed in enigma_asgi_wrapper: "
                              f"{type(exc).__name__}: {exc}") from exc
        if result is not None:
            wrapped = result
    if wrapped is not app:
        wrapped.state = app.state  # routes and tests reach the context through app.state
    return wrapped


HEALTH_PATHS = {
    "/health": "Alive: 200 while the server and its engines run, 503 once one has died",
    "/health/ready": "Ready: 200 once models are loaded and engines step; 503 while loading or shutting down",
    "/health/full": "State, per-model engine stats (KV usage, queues), plugins' checks and versions",
    "/openapi.json": "This document",
}


def openapi_document(transports: list[Any]) -> dict[str, Any]:
    """OpenAPI 3.1 for the app: health routes, and what each transport describes (``openapi()``)."""
    import enigma

    paths: dict[str, Any] = {path: {"get": {"summary": summary, "responses": {"200": {"description": "OK"}}}}
                             for path, summary in HEALTH_PATHS.items()}
    components: dict[str, Any] = {"schemas": {}, "securitySchemes": {
        "bearer": {"type": "http", "scheme": "bearer", "description": "an API key from `enigma keys create`"}}}
    for transport in transports:
        describe = getattr(transport, "openapi", None)
        if describe is None:
            continue
        part = describe()
        paths.update(part.get("paths", {}))
        components["schemas"].update(part.get("components", {}).get("schemas", {}))
    return {"openapi": "3.1.0", "info": {"title": "enigma", "version": enigma.__version__},
            "paths": paths, "components": components, "security": [{"bearer": []}, {}]}


class RequestGuard:
    """Core middleware (pure ASGI): request ids, body-size limit, access log."""

    def __init__(self, app: Any, *, context: ServerContext) -> None:
        self.app = app
        self.context = context

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        limit = self.context.max_body_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_error(send, APIError(413, f"the request body is {int(declared)} bytes; the limit is "
                                                  f"{limit} bytes", code="request_too_large"))
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise APIError(413, f"the request body exceeds the limit of {limit} bytes",
                                   code="request_too_large")
            return message

        status_holder: dict[str, int] = {}

        async def tracking_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, limited_receive, tracking_send)
        finally:
            logger.info("%s %s %s %.1f ms id=%s", scope.get("method"), scope.get("path"),
                        status_holder.get("status", "-"), (time.perf_counter() - started) * 1000, request_id)


async def _send_error(send: Any, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- health


def _context(request: Any) -> ServerContext:
    return request.app.state.context


async def health(request: Any) -> Any:
    """Alive: 200 while the server and its engines run; 503 once one has died."""
    from starlette.responses import JSONResponse

    context = _context(request)
    alive = context.alive
    return JSONResponse({"status": "ok" if alive else "dead"}, status_code=200 if alive else 503)


async def health_ready(request: Any) -> Any:
    """Ready: models loaded and engines stepping; 503 while loading and during shutdown."""
    from starlette.responses import JSONResponse

    context = _context(request)
    ready = context.ready
    return JSONResponse({"status": "ready" if ready else context.state}, status_code=200 if ready else 503)


async def health_full(request: Any) -> Any:
    """Everything: state, per-model engine stats (KV usage, queues), plugins' checks (``enigma_health``),
    versions."""
    from importlib.metadata import version

    from starlette.responses import JSONResponse

    import enigma
    from enigma.plugins import get_host

    context = _context(request)
    models = {}
    for name, served in context.models.items():
        stats = served.engine.stats() if served.engine is not None else {}
        models[name] = {"kind": "embedding" if served.is_embedding_model else "generation",
                        "max_model_len": served.max_model_len, "engine": stats}
    host = get_host()
    plugins = {record.name: record.version for record in host.records.values()}
    checks = {}
    for implementation in reversed(host.hook.enigma_health.get_hookimpls()):
        try:
            report = implementation.function()
        except Exception as exc:  # a failing report is itself news
            report = {"status": "down", "error": f"{type(exc).__name__}: {exc}"}
        if report is not None:
            checks[implementation.plugin_name] = report
    return JSONResponse({
        "status": context.state, "alive": context.alive, "uptime_s": round(time.time() - context.started, 3),
        "models": models, "checks": checks,
        "versions": {"enigma-core": enigma.__version__, "torch": version("torch"), "plugins": plugins},
    })
