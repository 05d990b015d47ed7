"""enigma's HTTP server: a Starlette app composed from transport plugins' routes.

``build_app(context)`` gathers the routes of every available ``transport``
implementation, adds the health routes, and wraps everything in the
middleware core owns (request ids, body limits, OpenAI-shaped errors).
``serve(...)`` runs it under Hypercorn; ``enigma serve`` is its command.
"""

from __future__ import annotations

from enigma.server.context import ServedModel, ServerContext

__all__ = ["ServedModel", "ServerContext"]
