"""Serving over HTTP/2, and shutting down gracefully with a stream in flight."""

from __future__ import annotations

import signal
import subprocess
import threading

import httpx
from serving import ENIGMA, launch


def test_http2_with_prior_knowledge(server):
    with httpx.Client(http1=False, http2=True) as client:
        response = client.get(f"{server[0]}/v1/models")
    assert response.http_version == "HTTP/2" and response.json()["data"]


def test_sigterm_lets_an_in_flight_stream_finish(server, tmp_path):
    env = {**server[1], "ENIGMA_HOME": str(tmp_path)}
    subprocess.run([str(ENIGMA), "pull", str(server[2]), "--name", "tiny"], env=env, check=True, capture_output=True)
    process, base = launch(env, "tiny", "--graceful-timeout", "60", log_path=tmp_path / "server.log")
    lines: list[str] = []
    started = threading.Event()

    def stream() -> None:
        body = {"model": "tiny", "prompt": "Once", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                lines.append(line)
                started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(60)
    with httpx.Client() as probe:
        assert probe.get(f"{base}/health/ready").status_code == 200
        process.send_signal(signal.SIGTERM)
        reader.join(120)
    assert process.wait(timeout=60) == 0
    events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"finish_reason": "length"' in events[-2]  # the answer ran to its end, not cut off
