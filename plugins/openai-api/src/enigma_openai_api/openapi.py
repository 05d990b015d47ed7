"""The OpenAPI description of the routes, generated from the same field tables the validator uses."""

from __future__ import annotations

from typing import Any

from enigma.server.openai_fields import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    DETOKENIZE_FIELDS,
    EMBEDDING_FIELDS,
    NUMBER,
    TOKENIZE_FIELDS,
)

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
SCHEMA_TYPES = {str: "string", int: "integer", bool: "boolean", dict: "object", list: "array"}


def _schema(kinds: Any, description: str) -> dict[str, Any]:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if kinds == NUMBER:
        return {"type": "number", "description": description}
    names = [SCHEMA_TYPES[kind] for kind in kinds]
    return {"type": names[0] if len(names) == 1 else names, "description": description}


def request_schema(fields: dict[str, tuple[Any, str]], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "required": required, "additionalProperties": False,
            "properties": {name: _schema(kinds, description) for name, (kinds, description) in fields.items()}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(status): {"description": "OpenAI's error object",
                          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            for status in statuses}


def _post(summary: str, schema: str, streams: bool) -> dict[str, Any]:
    content = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        content["text/event-stream"] = {"schema": {"type": "string", "description": "data: <chunk> events, "
                                                   "then data: [DONE]"}}
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}},
        "responses": {"200": {"description": "the result", "content": content},
                      **_errors(400, 401, 404, 413, 429, 503)}}}


def openapi_paths() -> dict[str, Any]:
    return {
        "/v1/chat/completions": _post("Chat completion (SSE when stream is true)", "ChatCompletionRequest", True),
        "/v1/completions": _post("Text completion (SSE when stream is true)", "CompletionRequest", True),
        "/v1/embeddings": _post("Embeddings (float or base64)", "EmbeddingRequest", False),
        "/v1/models": {"get": {"summary": "The served models", "responses": {
            "200": {"description": "a list of models"}, **_errors(401, 429)}}},
        "/v1/models/{model_id}": {"get": {"summary": "One served model", "parameters": [
            {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the model"}, **_errors(401, 404, 429)}}},
        "/tokenize": _post("Token ids of a prompt or a chat (vLLM's)", "TokenizeRequest", False),
        "/detokenize": _post("The text of token ids (vLLM's)", "DetokenizeRequest", False),
        "/tokenizer_info": {"get": {"summary": "Special tokens, chat template and context length (vLLM's)",
                                    "responses": {"200": {"description": "the tokenizer"}, **_errors(400, 404)}}},
    }


def openapi_components() -> dict[str, Any]:
    return {
        "Error": ERROR,
        "ChatCompletionRequest": request_schema(CHAT_FIELDS, ["model", "messages"]),
        "CompletionRequest": request_schema(COMPLETION_FIELDS, ["model", "prompt"]),
        "EmbeddingRequest": request_schema(EMBEDDING_FIELDS, ["model", "input"]),
        "TokenizeRequest": request_schema(TOKENIZE_FIELDS, []),
        "DetokenizeRequest": request_schema(DETOKENIZE_FIELDS, ["tokens"]),
    }
