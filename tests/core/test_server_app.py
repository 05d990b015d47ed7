"""The server app in-process (Starlette's TestClient): health states and errors, no model needed."""

from __future__ import annotations

import attrs
import pytest
from starlette.testclient import TestClient

from enigma.server.app import build_app
from enigma.server.context import ServedModel, ServerContext
from enigma.server.errors import APIError, from_exception


@attrs.define
class FakeEngine:
    is_running: bool = True

    def stats(self):
        return {"running": 0, "kv_blocks_used": 0}

    def shutdown(self):
        self.is_running = False


@attrs.define
class FakeLLM:
    max_model_len: int = 128


def app_for(context):
    return TestClient(build_app(context, load_models=False), raise_server_exceptions=False)


def test_ready_is_503_while_loading_and_models_say_so():
    context = ServerContext(["tiny"])
    with app_for(context) as client:
        assert client.get("/health").status_code == 200
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and ready.json() == {"status": "loading"}
        with pytest.raises(APIError) as loading:
            context.model("tiny")
        assert loading.value.status == 503 and loading.value.headers["Retry-After"] == "2"


def test_health_is_503_once_an_engine_died():
    context = ServerContext(["tiny"])
    engine = FakeEngine()
    context.models["tiny"] = ServedModel(name="tiny", llm=FakeLLM(), engine=engine, created=0)
    context.state = "ready"
    with app_for(context) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/health/ready").status_code == 200
        engine.is_running = False
        assert client.get("/health").status_code == 503
        assert client.get("/health/ready").status_code == 503
        full = client.get("/health/full").json()
        assert full["alive"] is False and full["models"]["tiny"]["engine"]["running"] == 0
    assert context.state == "stopping"  # the lifespan's end


def test_every_error_is_openai_shaped():
    context = ServerContext([])
    context.state = "ready"
    with app_for(context) as client:
        missing = client.get("/v1/nothing")
        assert missing.status_code == 404
        assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
        wrong_method = client.post("/health")
        assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
        too_big = client.post("/v1/chat/completions", content=b"x" * (5 * 2**20))
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
        assert client.get("/health").headers["x-request-id"]


def test_mid_stream_failures_become_an_error_event():
    error = from_exception(RuntimeError("the engine tripped"))
    assert error.status == 500 and error.sse().startswith(b'data: {"error": {"message": "internal error')
    from enigma.engine.async_engine import EngineDeadError

    assert from_exception(EngineDeadError("stopped")).status == 503
