"""/v1/ws with the websockets client: stream, multiplex, cancel, bad messages."""

from __future__ import annotations

import asyncio
import json

import httpx
from websockets.asyncio.client import connect

from enigma import SamplingParams

MESSAGES = [{"role": "user", "content": "Say something about lists."}]


def ws_url(base):
    return base.replace("http://", "ws://") + "/v1/ws"


async def collect(socket, ids):
    """Messages by request id until each of ``ids`` is done (or failed)."""
    by_id = {request_id: [] for request_id in ids}
    pending = set(ids)
    while pending:
        message = json.loads(await asyncio.wait_for(socket.recv(), 30))
        by_id.setdefault(message.get("id"), []).append(message)
        if message["type"] in ("done", "error"):
            pending.discard(message.get("id"))
    return by_id


def test_streams_a_chat_and_multiplexes_requests(server, reference):
    async def main():
        async with connect(ws_url(server[0])) as socket:
            await socket.send(json.dumps({"type": "chat", "id": "a", "model": "tiny", "messages": MESSAGES,
                                          "max_tokens": 12, "temperature": 0}))
            await socket.send(json.dumps({"type": "completion", "id": "b", "model": "tiny",
                                          "prompt": "The quick brown", "max_tokens": 10, "temperature": 0}))
            return await collect(socket, ["a", "b"])

    by_id = asyncio.run(main())
    chat = reference.chat(MESSAGES, SamplingParams(max_tokens=12, temperature=0))[0].outputs[0]
    completion = reference.generate("The quick brown", SamplingParams(max_tokens=10, temperature=0))[0].outputs[0]
    for request_id, expected in (("a", chat), ("b", completion)):
        messages = by_id[request_id]
        assert "".join(m["text"] for m in messages if m["type"] == "delta") == expected.text
        done = messages[-1]
        assert done["type"] == "done" and done["choices"] == [{"index": 0, "finish_reason": expected.finish_reason}]
        assert done["usage"]["completion_tokens"] == len(expected.token_ids)


def test_cancel_one_request_and_keep_the_others(server):
    async def main():
        async with connect(ws_url(server[0])) as socket:
            long = {"type": "completion", "model": "tiny", "prompt": "Once", "max_tokens": 8000, "ignore_eos": True}
            await socket.send(json.dumps({**long, "id": "long"}))
            await socket.send(json.dumps({"type": "completion", "id": "short", "model": "tiny", "prompt": "Hi",
                                          "max_tokens": 3}))
            first = json.loads(await socket.recv())
            await socket.send(json.dumps({"type": "cancel", "id": "long"}))
            rest = await collect(socket, ["long", "short"])
            return first, rest

    first, by_id = asyncio.run(main())
    assert first["type"] == "delta"
    assert by_id["long"][-1]["type"] == "done" and by_id["long"][-1]["choices"][0]["finish_reason"] == "cancelled"
    assert by_id["long"][-1]["usage"]["completion_tokens"] < 8000
    assert by_id["short"][-1]["type"] == "done"
    engine = httpx.get(f"{server[0]}/health/full").json()["models"]["tiny"]["engine"]
    assert engine["running"] == 0 and engine["kv_blocks_used"] == 0


def test_bad_messages_get_errors_and_the_socket_stays_open(server):
    async def main():
        async with connect(ws_url(server[0])) as socket:
            replies = []
            for raw in ["not json", "[1]", json.dumps({"type": "dance", "id": "x"}),
                        json.dumps({"type": "chat", "id": "t", "model": "tiny", "messages": MESSAGES,
                                    "temperature": -3}),
                        json.dumps({"type": "chat", "id": "m", "model": "nope", "messages": MESSAGES}),
                        json.dumps({"type": "cancel", "id": "nothing-running"})]:
                await socket.send(raw)
                replies.append(json.loads(await socket.recv()))
            await socket.send(json.dumps({"type": "completion", "id": "ok", "model": "tiny", "prompt": "Hi",
                                          "max_tokens": 2}))
            replies.append((await collect(socket, ["ok"]))["ok"][-1])
            return replies

    replies = asyncio.run(main())
    assert [r["type"] for r in replies] == ["error"] * 6 + ["done"]
    assert "not valid JSON" in replies[0]["error"]["message"]
    assert replies[2]["error"]["param"] == "type"
    assert replies[3]["id"] == "t" and replies[3]["error"]["param"] == "temperature"
    assert replies[4]["error"]["code"] == "model_not_found"
    assert replies[5]["error"]["code"] == "not_found"


def test_structured_output_streams_and_tool_calls_are_refused(server):
    """A JSON schema holds over the socket too; tools are answered as tool_calls over HTTP only."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    tool = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}

    async def main():
        async with connect(ws_url(server[0])) as socket:
            await socket.send(json.dumps({"type": "chat", "id": "s", "model": "tiny", "messages": MESSAGES,
                                          "max_tokens": 40, "guided_json": schema}))
            await socket.send(json.dumps({"type": "chat", "id": "t", "model": "tiny", "messages": MESSAGES,
                                          "max_tokens": 5, "tools": [tool]}))
            return await collect(socket, ["s", "t"])

    by_id = asyncio.run(main())
    text = "".join(m["text"] for m in by_id["s"] if m["type"] == "delta")
    assert json.loads(text) in ({"ok": True}, {"ok": False})
    assert by_id["t"][-1]["type"] == "error" and by_id["t"][-1]["error"]["param"] == "tools"
