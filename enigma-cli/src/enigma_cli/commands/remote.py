"""Answering through a running ``enigma serve``, as ``ollama run`` talks to its server.

When a server on the configured host and port is ready and serves the model,
a one-shot ``enigma run`` streams the answer from it: no torch import, no
model load, the first token in a fraction of a second. Otherwise the command
loads the model in-process. Standard library only, to keep this path light.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any, TextIO

PROBE_TIMEOUT = 0.3


def _request(url: str, *, body: dict[str, Any] | None = None, key: str | None = None,
             timeout: float | None = None) -> Any:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    return urllib.request.urlopen(request, timeout=timeout)


def find_server(host: str, port: int, model: str) -> str | None:
    """The base URL of a ready local server that serves ``model``, or None."""
    base = f"http://{host}:{port}"
    key = os.environ.get("ENIGMA_API_KEY")
    try:
        with _request(f"{base}/health/ready", timeout=PROBE_TIMEOUT) as response:
            if response.status != 200:
                return None
        with _request(f"{base}/v1/models", key=key, timeout=PROBE_TIMEOUT) as response:
            served = {entry["id"] for entry in json.load(response)["data"]}
    except (OSError, ValueError, KeyError, urllib.error.URLError):
        return None
    names = {model, model.removesuffix(":latest"), f"{model}:latest"}
    return base if served & names else None


def answer_remotely(base: str, model: str, text: str, options: dict[str, Any], out: TextIO) -> None:
    """Stream one chat answer from the server to ``out``."""
    messages = [{"role": "system", "content": options["system"]}] if options.get("system") else []
    body: dict[str, Any] = {"model": model, "messages": [*messages, {"role": "user", "content": text}],
                            "stream": True}
    for key in ("temperature", "top_p", "top_k", "max_tokens", "seed"):
        if options.get(key) is not None:
            body[key] = options[key]
    try:
        response = _request(f"{base}/v1/chat/completions", body=body, key=os.environ.get("ENIGMA_API_KEY"))
    except urllib.error.HTTPError as exc:
        from enigma.errors import BadRequestError

        message = json.loads(exc.read() or b"{}").get("error", {}).get("message", str(exc))
        raise BadRequestError(message) from None
    with response:
        for raw in response:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                from enigma.errors import EnigmaError

                raise EnigmaError(chunk["error"]["message"])
            for choice in chunk.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    out.write(content)
                    out.flush()
    out.write("\n")
    out.flush()
