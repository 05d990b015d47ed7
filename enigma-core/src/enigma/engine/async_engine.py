"""A background step loop with async token streams, for servers.

One thread owns the :class:`~enigma.engine.engine.Engine` and steps it while
there is work; coroutines submit requests and read their outputs from
per-request queues. Leaving the ``async for`` early (a client disconnects,
the task is cancelled) aborts the request, so its KV blocks return to the
pool at once.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

from enigma.engine.engine import Engine
from enigma.outputs import RequestOutput
from enigma.sampling import SamplingParams


class EngineDeadError(RuntimeError):
    """The step loop stopped on an error; no more requests can run."""


class AsyncEngine:
    """Runs an Engine's step loop in a thread; ``generate`` streams outputs."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: list[tuple[str, Any, SamplingParams, int, str | None]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="enigma-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.error is None

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, *, priority: int = 0, prompt_text: str | None = None,
                       adapter: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a prompt's outputs as deltas: each holds only the tokens and text new
        since the previous one; the last has ``finished`` set and the finish reason."""
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped: {self.error!r}")
        request_id = request_id or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        with self._wake:
            if request_id in self._streams:
                from enigma.errors import BadRequestError

                raise BadRequestError(f"request id {request_id!r} is already streaming; ids must be unique")
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
            self._pending.append((request_id, prompt, params or SamplingParams(), priority, prompt_text, adapter))
            self._wake.notify()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            with self._wake:
                self._streams.pop(request_id, None)
                if not finished:
                    self._aborts.append(request_id)
                    self._wake.notify()

    def abort(self, request_id: str) -> None:
        with self._wake:
            self._aborts.append(request_id)
            self._wake.notify()

    def stats(self) -> dict[str, float]:
        with self._lock:
            return self.engine.stats()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the loop: running requests are aborted, their streams end."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------ the loop

    def _deliver(self, request_id: str, item: Any) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, queue = stream
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._wake:
                    while not (self._pending or self._aborts or self._stopping or engine.has_unfinished()):
                        self._wake.wait()
                    if self._stopping:
                        for request_id in list(self._streams):
                            engine.abort(request_id)
                            self._deliver(request_id, EngineDeadError("the engine is shutting down"))
                        break
                    pending, self._pending = self._pending, []
                    aborts, self._aborts = self._aborts, []
                    for request_id in aborts:
                        engine.abort(request_id)
                    for request_id, prompt, params, priority, prompt_text, adapter in pending:
                        try:
                            engine.add_request(request_id, prompt, params, priority=priority,
                                               prompt_text=prompt_text, adapter=adapter)
                        except Exception as exc:  # bad input: that request fails, the loop goes on
                            self._deliver(request_id, exc)
                outputs = engine.step(delta=True) if engine.has_unfinished() else []
                with self._wake:
                    for output in outputs:
                        self._deliver(output.request_id, output)
        except BaseException as exc:  # the engine itself broke: fail every stream, say so in health
            self.error = exc
            with self._wake:
                for request_id in list(self._streams):
                    self._deliver(request_id, EngineDeadError(f"the engine stopped: {exc!r}"))
        finally:
            engine.close()
