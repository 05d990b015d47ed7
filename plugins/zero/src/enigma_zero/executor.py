"""The ``tensor-parallel`` executor: a driver (this process, rank 0) and N-1 worker processes.

The engine, scheduler and paged cache stay in the driver and see one runner.
Each step the driver sends the step's chunks (token ids, positions, block
tables) to every worker over a pipe; all ranks then run the same forward pass
on their shards, meeting in the all-reduces of :mod:`enigma_zero.tensor_parallel`
(a gloo process group on 127.0.0.1), and the driver receives the whole logits.
Every rank builds the same attention metadata from the chunks and writes its
KV heads into its own pool, which the driver's block tables address.

Workers are started with the runner and stopped with it (``close``, the
engine's end, or this process's exit; a worker whose driver vanished exits on
its own). A worker that dies fails the step with an error naming its rank; the
engine stops and the server reports unhealthy — nothing waits forever, since
the collectives carry a timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from multiprocessing.connection import Client, Listener
from typing import Any

import torch

from enigma.errors import ConfigError, EnigmaError
from enigma.runner import ExecutorOptions, ModelRunner, SequenceChunk, StepLogits

COLLECTIVE_TIMEOUT_S = float(os.environ.get("ENIGMA_TP_TIMEOUT_S", "120"))
"""How long a rank waits in an all-reduce for the others before the step fails."""
STARTUP_TIMEOUT_S = 120.0
"""How long the driver waits for its workers to connect."""


class WorkerFailedError(EnigmaError):
    """A tensor-parallel worker died or failed; the engine cannot go on."""


class TensorParallelExecutor:
    """Registered as executor ``tensor-parallel``."""

    def create_runner(self, loaded: Any, backend: Any, *, block_size: int,
                      options: ExecutorOptions) -> TensorParallelRunner:
        return TensorParallelRunner(loaded, backend, block_size=block_size, options=options)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class TensorParallelRunner(ModelRunner):
    """Rank 0's shard in this process, the other ranks' in workers; a :class:`ModelRunner` to the engine."""

    overlaps_steps = False
    """Its steps are collectives with the workers: the engine queues none ahead."""

    def __init__(self, loaded: Any, backend: Any, *, block_size: int, options: ExecutorOptions) -> None:
        import torch.distributed as dist

        from enigma_zero.launch import free_port
        from enigma_zero.tensor_parallel import ShardedCausalLM, check_shardable, shard_llama

        size = options.tensor_parallel_size
        check_shardable(loaded.model, size)
        if dist.is_initialized():
            raise ConfigError("this process already belongs to a torch.distributed group (another tensor-parallel "
                              "model, or a training rank); serve one tensor-parallel model per process")
        self.size = size
        self.workers: list[tuple[subprocess.Popen, Any]] = []
        self.failure: str | None = None
        spec = {"folder": str(loaded.folder), "dtype": _dtype_name(loaded.dtype), "backend": options.backend,
                "device": options.device, "load_options": dict(options.load_options or {}), "size": size,
                "port": free_port(), "block_size": block_size}
        self._finalizer = weakref.finalize(self, _stop_workers, self.workers)
        atexit.register(self._finalizer)
        torch.set_num_threads(max(1, torch.get_num_threads() // size))  # the ranks share this machine's cores
        try:
            self._start_workers(spec)
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{spec['port']}", rank=0,
                                    world_size=size, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
            shard = shard_llama(loaded.model, 0, size)
            prepared = ShardedCausalLM(backend.prepare(shard, dtype=loaded.dtype), rank=0, size=size)
            super().__init__(None, backend, block_size=block_size, prepared=prepared, dtype=loaded.dtype)
            self._await_workers()
        except BaseException:
            self.close()
            raise

    def _start_workers(self, spec: dict[str, Any]) -> None:
        """``python -m enigma_zero.executor`` per rank, each connecting back to a listener on 127.0.0.1 that
        only holders of this run's key may join."""
        key = secrets.token_bytes(32)
        with Listener(("127.0.0.1", 0), authkey=key) as listener:
            address = listener.address
            env = {**os.environ, "ENIGMA_TP_KEY": key.hex()}
            for rank in range(1, self.size):
                process = subprocess.Popen([sys.executable, "-m", "enigma_zero.executor", f"{address[0]}:{address[1]}",
                                            str(rank)], env=env)
                self.workers.append((process, None))
            accepted: queue.Queue = queue.Queue()
            threading.Thread(target=_accept, args=(listener, self.size - 1, accepted), daemon=True).start()
            connected: dict[int, Any] = {}
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while len(connected) < self.size - 1:
                dead = [rank for rank, (process, _) in enumerate(self.workers, start=1) if process.poll() is not None]
                if dead:
                    raise WorkerFailedError(self._describe_death(dead[0]))
                if time.monotonic() > deadline:
                    raise WorkerFailedError(f"tensor-parallel workers did not connect in {STARTUP_TIMEOUT_S:.0f} s")
                try:
                    connection = accepted.get(timeout=0.2)
                except queue.Empty:
                    continue
                rank = connection.recv()
                connection.send(spec | {"rank": rank})
                connected[rank] = connection
        self.workers[:] = [(process, connected[rank]) for rank, (process, _) in enumerate(self.workers, start=1)]

    def _await_workers(self) -> None:
        for rank, (_, pipe) in enumerate(self.workers, start=1):
            reply = self._receive(rank, pipe)
            if reply != "ready":
                raise WorkerFailedError(f"tensor-parallel worker rank {rank} failed to start: {reply}")

    def _receive(self, rank: int, pipe: Any) -> Any:
        try:
            return pipe.recv()
        except (EOFError, OSError):
            raise WorkerFailedError(self._describe_death(rank)) from None

    def _describe_death(self, rank: int) -> str:
        process = self.workers[rank - 1][0]
        try:
            code = process.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        how = ("is still running but stopped answering" if code is None else
               f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}")
        return f"tensor-parallel worker rank {rank} of {self.size} {how}"

    def _command(self, *message: Any) -> None:
        if self.failure is not None:
            raise WorkerFailedError(self.failure)
        for rank, (process, pipe) in enumerate(self.workers, start=1):
            if process.poll() is not None:
                self.failure = self._describe_death(rank)
                raise WorkerFailedError(self.failure)
            try:
                pipe.send(message)
            except (BrokenPipeError, OSError):
                self.failure = self._describe_death(rank)
                raise WorkerFailedError(self.failure) from None

    def resize(self, num_blocks: int) -> None:
        if self.workers:
            self._command("resize", num_blocks)
        super().resize(num_blocks)

    def execute(self, chunks: Sequence[SequenceChunk]) -> StepLogits:
        self._command("execute", list(chunks))
        try:
            return super().execute(chunks)
        except RuntimeError as exc:  # a collective failed: a peer died or timed out
            dead = [rank for rank, (process, _) in enumerate(self.workers, start=1) if process.poll() is not None]
            self.failure = (self._describe_death(dead[0]) if dead else
                            f"a tensor-parallel step failed in a collective ({exc})")
            raise WorkerFailedError(self.failure) from None

    def close(self) -> None:
        """Stop the workers and leave the process group (idempotent)."""
        import torch.distributed as dist

        _stop_workers(self.workers)
        if dist.is_initialized():
            dist.destroy_process_group()


def _accept(listener: Listener, count: int, accepted: queue.Queue) -> None:
    with contextlib.suppress(OSError):  # the listener closed: the driver gave up waiting
        for _ in range(count):
            accepted.put(listener.accept())


def _stop_workers(workers: list[tuple[subprocess.Popen, Any]]) -> None:
    """Ask each worker to stop, then make sure it has (emptying ``workers``)."""
    for _, pipe in workers:
        if pipe is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                pipe.send(("stop",))
    for process, pipe in workers:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        if pipe is not None:
            pipe.close()
    workers.clear()


def worker_main(address: str, rank: int) -> None:
    """A worker: connect to the driver, join the group, load and shard the model, then run the driver's
    commands until ``stop`` (or until the driver is gone)."""
    import torch.distributed as dist

    from enigma.loader import load_model
    from enigma.plugins import get_host
    from enigma_zero.tensor_parallel import ShardedCausalLM, shard_llama

    host, port = address.rsplit(":", 1)
    pipe = Client((host, int(port)), authkey=bytes.fromhex(os.environ.pop("ENIGMA_TP_KEY")))
    pipe.send(rank)
    spec = pipe.recv()
    size = spec["size"]
    torch.set_num_threads(max(1, torch.get_num_threads() // size))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{spec['port']}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        try:
            backend = get_host().create("backend", spec["backend"], device=spec["device"])
            loaded = load_model(spec["folder"], dtype=spec["dtype"], device=backend.device,
                                options=spec["load_options"] or None)
            shard = shard_llama(loaded.model, rank, size)
            prepared = ShardedCausalLM(backend.prepare(shard, dtype=loaded.dtype), rank=rank, size=size)
            runner = ModelRunner(None, backend, block_size=spec["block_size"], prepared=prepared, dtype=loaded.dtype)
        except Exception as exc:  # say why to the driver, which reports it
            pipe.send(f"{type(exc).__name__}: {exc}")
            return
        pipe.send("ready")
        while True:
            try:
                message = pipe.recv()
            except (EOFError, OSError):  # the driver is gone
                return
            if message[0] == "execute":
                runner.execute(message[1])
            elif message[0] == "resize":
                runner.resize(message[1])
            else:
                return
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    worker_main(sys.argv[1], int(sys.argv[2]))
