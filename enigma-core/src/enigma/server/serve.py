"""Running the app under Hypercorn (HTTP/1.1 and HTTP/2), with graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence
from typing import Any

from enigma.server.context import ServerContext


def hypercorn_config(host: str, port: int, *, graceful_timeout: float = 30.0, workers: int = 1) -> Any:
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = graceful_timeout  # in-flight streams get this long to finish
    config.workers = workers
    config.accesslog = None
    config.keep_alive_timeout = 75
    return config


async def serve_async(context: ServerContext, host: str, port: int, *, shutdown: asyncio.Event | None = None,
                      graceful_timeout: float = 30.0) -> None:
    """Serve until ``shutdown`` is set (or SIGINT/SIGTERM when none is given)."""
    from hypercorn.asyncio import serve

    from enigma.server.app import build_app

    app = build_app(context)
    stop = shutdown or asyncio.Event()
    if shutdown is None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)

    async def trigger() -> None:
        await stop.wait()
        context.state = "stopping"  # readiness turns false before connections close

    await serve(app, hypercorn_config(host, port, graceful_timeout=graceful_timeout), shutdown_trigger=trigger)


def serve_models(models: Sequence[str], host: str, port: int, **options: Any) -> None:
    """Load ``models`` and serve them until interrupted (what ``enigma serve`` runs)."""
    llm_options = options.pop("llm_options", {})
    context = ServerContext(models, llm_options=llm_options, **options)
    asyncio.run(serve_async(context, host, port))
