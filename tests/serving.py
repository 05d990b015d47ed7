"""Running `enigma serve` for tests: a real server process on a free loopback port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ENIGMA = Path(sys.executable).parent / "enigma"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
