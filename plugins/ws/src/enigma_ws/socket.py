"""The /v1/ws endpoint: one task per request, all multiplexed on one socket."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from enigma.server import (
    APIError,
    ServerContext,
    charge_tokens,
    from_exception,
    prepare_chat,
    prepare_completion,
    start,
)


class WebSocketTransport:
    def routes(self, context: ServerContext) -> list[Any]:
        from starlette.routing import WebSocketRoute

        async def endpoint(websocket: Any) -> None:
            await Session(context, websocket).run()

        return [WebSocketRoute("/v1/ws", endpoint)]


class Session:
    """One client connection and its running requests."""

    def __init__(self, context: ServerContext, websocket: Any) -> None:
        self.context = context
        self.websocket = websocket
        self.tasks: dict[str, asyncio.Task] = {}
        self.send_lock = asyncio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        async with self.send_lock:
            await self.websocket.send_text(json.dumps(message, ensure_ascii=False))

    async def error(self, request_id: Any, error: APIError) -> None:
        await self.send({"type": "error", "id": request_id, **error.body()})

    async def run(self) -> None:
        from starlette.websockets import WebSocketDisconnect

        await self.websocket.accept()
        try:
            while True:
                raw = await self.websocket.receive_text()
                await self.handle(raw)
        except WebSocketDisconnect:
            pass
        finally:
            for task in self.tasks.values():
                task.cancel()  # the engine aborts each request and frees its KV blocks
            if self.tasks:
                await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def handle(self, raw: str) -> None:
        try:
            message = json.loads(raw)
        except json.JSONDecodeError as exc:
            await self.error(None, APIError(400, f"the message is not valid JSON: {exc.msg}", code="invalid_json"))
            return
        if not isinstance(message, dict):
            await self.error(None, APIError(400, "a message must be a JSON object", code="invalid_json"))
            return
        kind = message.pop("type", None)
        request_id = message.pop("id", None)
        if request_id is not None and not isinstance(request_id, str):
            await self.error(None, APIError(400, "'id' must be a string", param="id"))
            return
        if kind == "cancel":
            task = self.tasks.get(request_id)
            if task is None:
                await self.error(request_id, APIError(404, f"no running request with id {request_id!r}",
                                                      param="id", code="not_found"))
            else:
                task.cancel()
            return
        if kind not in ("chat", "completion"):
            await self.error(request_id, APIError(400, f"'type' must be chat, completion or cancel; got {kind!r}",
                                                  param="type"))
            return
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.tasks:
            await self.error(request_id, APIError(400, f"request id {request_id!r} is already running",
                                                  param="id"))
            return
        self.tasks[request_id] = asyncio.create_task(self.generate(kind, request_id, message))

    async def generate(self, kind: str, request_id: str, body: dict[str, Any]) -> None:
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        finish: dict[int, str | None] = {}
        try:
            body.pop("stream", None)
            body.pop("stream_options", None)
            tenant = (self.websocket.scope.get("state") or {}).get("api_key")
            prepare = prepare_chat if kind == "chat" else prepare_completion
            prepared = prepare(self.context, body, tenant=tenant, transport="ws")
            if getattr(prepared, "tools", None) is not None:
                raise APIError(400, "tool calls are answered on POST /v1/chat/completions; this WebSocket "
                                    "streams text only", param="tools")
            if len(prepared.prompts) != 1:
                raise APIError(400, "a WebSocket completion takes one prompt", param="prompt")
            (_, token_ids), params = prepared.prompts[0], prepared.params[0]
            usage["prompt_tokens"] = len(token_ids)
            charge_tokens(self.websocket.scope.get("state") or {}, len(token_ids))
            finish = dict.fromkeys(range(params.n))
            stream = start(prepared, 0, f"ws-{uuid.uuid4().hex}")
            try:
                async for output in stream:
                    for completion in output.outputs:
                        usage["completion_tokens"] += len(completion.token_ids)
                        charge_tokens(self.websocket.scope.get("state") or {}, len(completion.token_ids))
                        if completion.text:
                            await self.send({"type": "delta", "id": request_id, "index": completion.index,
                                             "text": completion.text})
                        if completion.finish_reason:
                            finish[completion.index] = completion.finish_reason
            finally:
                await stream.aclose()  # cancelled or gone: the engine aborts the request
            await self.done(request_id, finish, usage, prepared.request.response_fields)
        except asyncio.CancelledError:
            finish = {index: reason or "cancelled" for index, reason in finish.items()} or {0: "cancelled"}
            await self.done(request_id, finish, usage, suppress=True)
        except Exception as exc:
            await self.error(request_id, from_exception(exc))
        finally:
            self.tasks.pop(request_id, None)

    async def done(self, request_id: str, finish: dict[int, str | None], usage: dict[str, int],
                   fields: dict[str, Any] | None = None, *, suppress: bool = False) -> None:
        usage = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
        message = {**(fields or {}), "type": "done", "id": request_id, "usage": usage,
                   "choices": [{"index": i, "finish_reason": reason} for i, reason in sorted(finish.items())]}
        try:
            await self.send(message)
        except Exception:
            if not suppress:
                raise
