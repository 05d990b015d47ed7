"""enigma transport ``ws``: token streaming over WebSocket."""

from __future__ import annotations

from enigma import hookimpl


@hookimpl
def enigma_register_transports(register):
    register("ws", "enigma_ws.socket:WebSocketTransport",
             summary="/v1/ws: stream tokens over WebSocket, several requests per socket, cancel by id")
