"""A real `enigma serve` on 127.0.0.1 with a tiny chat model and the real all-MiniLM-L6-v2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tiny_models import make_model, minilm_path

ENIGMA = Path(sys.executable).parent / "enigma"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """``(base_url, env)`` of a running server; stopped (SIGINT) after the session."""
    home = tmp_path_factory.mktemp("serve-home")
    env = {**os.environ, "ENIGMA_HOME": str(home)}
    # a long context, so that an abandoned stream would run for many seconds if not aborted
    folder = make_model(tmp_path_factory.mktemp("chat-model"), "llama-gqa", template="chatml",
                        max_position_embeddings=8192)
    for source, name in ((folder, "tiny"), (minilm_path(), "minilm")):
        subprocess.run([str(ENIGMA), "pull", str(source), "--name", name], env=env, check=True,
                       capture_output=True)
    process, base = launch(env, "tiny", "minilm", "--max-body-mb", "1", log_path=home / "server.log")
    yield base, env, folder
    stop(process)


def launch(env: dict[str, str], *args: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start `enigma serve ARGS` on a free port; return once it is ready."""
    port = free_port()
    log = log_path.open("w")
    process = subprocess.Popen([str(ENIGMA), "serve", *args, "--port", str(port)], env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/health/ready").status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the server did not become ready:\n{log_path.read_text()}")
        time.sleep(0.2)


def stop(process: subprocess.Popen) -> int:
    process.send_signal(2)
    try:
        return process.wait(timeout=30)
    finally:
        process.kill()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def reference(server):
    """The same chat model loaded in-process: what the server must match."""
    from enigma import LLM

    return LLM(server[2])
