"""Evaluating a model behind an OpenAI-compatible server (``enigma serve``, vLLM...), not in-process.

:class:`RemoteModel` offers what the evaluators call on an :class:`enigma.LLM`
— ``tokenizer.encode``, ``tokenizer.eos_token_ids``, ``max_model_len`` and
``generate(prompts, params)`` — over HTTP: vLLM's ``/tokenize`` and
``/tokenizer_info``, and ``/v1/completions`` (token-id prompts with ``echo``
and ``logprobs`` for prompt logprobs). Requests go out concurrently, so the
server batches them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from enigma.errors import BadRequestError, EnigmaError


class RemoteTokenizer:
    def __init__(self, remote: RemoteModel) -> None:
        self.remote = remote
        info = remote.call("GET", "/tokenizer_info")
        eos = info.get("eos_token")
        self.eos_token_ids: tuple[int, ...] = tuple(self.encode(eos, add_special_tokens=False)[:1]) if eos else ()

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        reply = self.remote.call("POST", "/tokenize", {"model": self.remote.model, "prompt": text,
                                                        "add_special_tokens": add_special_tokens})
        return list(reply["tokens"])


class RemoteModel:
    """A served model, evaluated through its HTTP API."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, concurrency: int = 16,
                 timeout: float = 600.0) -> None:
        self.root = base_url.rstrip("/").removesuffix("/v1")
        self.model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = timeout
        self._local = threading.local()  # one HTTP client per thread of the pool
        self.concurrency = concurrency
        self.tokenizer = RemoteTokenizer(self)
        self.max_model_len = int(self.call("POST", "/tokenize", {"model": model, "prompt": "x"})["max_model_len"])

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = httpx.Client(base_url=self.root, headers=self._headers,
                                                       timeout=self._timeout)
        try:
            response = client.request(method, path, json=body,
                                           params={"model": self.model} if method == "GET" else None)
        except httpx.HTTPError as exc:
            raise EnigmaError(f"{self.root}{path} could not be reached ({exc}); is the server running?") from exc
        if response.status_code != 200:
            raise EnigmaError(f"{self.root}{path} answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def generate(self, prompts: Sequence[Any], params: Any) -> list[Any]:
        """Like ``LLM.generate`` for the fields the evaluators read (text; prompt logprobs with ranks 1
        for the most likely token)."""
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._one, prompts, params_list))

    def _one(self, prompt: Any, params: Any) -> Any:
        from enigma.outputs import CompletionOutput, RequestOutput
        from enigma.sampling import Logprob

        body: dict[str, Any] = {"model": self.model, "prompt": prompt, "max_tokens": params.max_tokens or 1,
                                "temperature": params.temperature}
        if params.stop:
            body["stop"] = list(params.stop)
        ids = list(prompt) if not isinstance(prompt, str) else None
        if params.prompt_logprobs is not None:
            if ids is None:
                raise BadRequestError("prompt logprobs from a server need token-id prompts")
            body.update(echo=True, logprobs=1)
        choice = self.call("POST", "/v1/completions", body)["choices"][0]
        prompt_logprobs = None
        text = choice["text"] if params.prompt_logprobs is None else ""  # scoring reads logprobs only
        if params.prompt_logprobs is not None:
            scored = choice["logprobs"]
            prompt_logprobs = [None]
            for position in range(1, len(ids)):
                logprob, top = scored["token_logprobs"][position], scored["top_logprobs"][position] or {}
                rank = 1 if not top or logprob >= max(top.values()) - 1e-6 else 2
                prompt_logprobs.append({ids[position]: Logprob(logprob, rank)})
        return RequestOutput(request_id="remote", prompt=prompt if ids is None else None,
                             prompt_token_ids=ids or [], prompt_logprobs=prompt_logprobs,
                             outputs=[CompletionOutput(index=0, text=text, finish_reason=choice.get("finish_reason"))],
                             finished=True)
