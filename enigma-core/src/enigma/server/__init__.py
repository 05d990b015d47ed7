"""enigma's HTTP server, and the public API transports are written against.

``build_app(context)`` gathers the routes of every available ``transport``
implementation, adds the health routes, wraps everything in the middleware
core owns (request ids, body limits, API keys, rate limits, OpenAI-shaped
errors) and then in every plugin's ``enigma_asgi_wrapper``. ``serve(...)``
runs it under Hypercorn; ``enigma serve`` is its command.

A transport plugin imports what it needs from here, and nothing deeper:

``ServerContext``, ``ServedModel``
    the served models (``context.model(name)``), their engines and state.
``APIError``, ``from_exception``
    errors in OpenAI's shape, from any exception.
``charge_tokens(scope["state"], n)``
    count tokens against the caller's tokens/min budgets.
``GenerationRequest``, ``GenerationAnswer``, ``before_generation``, ``generation_finished``
    the request-level hooks (:mod:`enigma.server.generation`).
``prepare_chat``, ``prepare_completion``, ``Prepared``, ``start``
    OpenAI request bodies checked and turned into engine inputs, hooks run
    (:mod:`enigma.server.openai_requests`).
"""

from __future__ import annotations

from enigma.server.auth import charge_tokens
from enigma.server.context import ServedModel, ServerContext
from enigma.server.errors import APIError, from_exception
from enigma.server.generation import GenerationAnswer, GenerationRequest, before_generation, generation_finished
from enigma.server.openai_requests import Prepared, prepare_chat, prepare_completion, start

__all__ = [
    "APIError",
    "GenerationAnswer",
    "GenerationRequest",
    "Prepared",
    "ServedModel",
    "ServerContext",
    "before_generation",
    "charge_tokens",
    "from_exception",
    "generation_finished",
    "prepare_chat",
    "prepare_completion",
    "start",
]
