"""enigma transport ``openai-api``: the OpenAI-compatible HTTP API."""

from __future__ import annotations

from enigma import hookimpl


@hookimpl
def enigma_register_transports(register):
    register("openai-api", "enigma_openai_api.routes:OpenAITransport",
             summary="/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models (SSE streaming)")
