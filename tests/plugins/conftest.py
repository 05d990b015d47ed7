"""A real `enigma serve` on 127.0.0.1 with a tiny chat model and the real all-MiniLM-L6-v2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving import ENIGMA, launch, stop
from tiny_models import make_model, minilm_path


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """``(base_url, env, chat model folder)`` of a running server; stopped (SIGINT) after the session."""
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


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def reference(server):
    """The same chat model loaded in-process: what the server must match."""
    from enigma import LLM

    return LLM(server[2])
