"""Starting the ranks of a one-machine job: torch's elastic launcher, progress relayed, failures named.

The launcher is the one ``torchrun`` runs (``torch.distributed.launcher``):
a c10d rendezvous on a free local port, one process per rank, no restarts —
when a rank dies the others are stopped and the job fails with that rank's
number and how it ended. The main rank appends its progress reports to a
file as JSON lines; this process reads them back and hands them to the
caller's callback, so ``enigma train --nproc N`` draws the same bar as one
process does.
"""

from __future__ import annotations

import json
import socket
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import attrs

from enigma.errors import EnigmaError
from enigma.training.checkpoint import latest_checkpoint
from enigma.training.config import TrainConfig
from enigma.training.progress import ProgressCallback, TrainProgress

ERRORS_DIR = "errors"


class RankFailedError(EnigmaError):
    """A rank of a training job failed; the message names it."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(config: TrainConfig, progress: ProgressCallback | None) -> Path:
    """Run ``config`` on ``config.nproc`` ranks on this machine; return the output folder."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    out = Path(config.out).expanduser()
    with tempfile.TemporaryDirectory(prefix="enigma-zero-") as scratch:
        folder = Path(scratch)
        (folder / ERRORS_DIR).mkdir()
        (folder / "config.json").write_text(json.dumps(config.to_dict()), encoding="utf-8")
        events = folder / "progress.jsonl"
        events.touch()
        launch_config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=config.nproc, run_id=f"enigma-{uuid.uuid4().hex[:12]}",
            rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0, monitor_interval=0.2)
        relay = ProgressRelay(events, progress)
        relay.start()
        try:
            elastic_launch(launch_config, sys.executable)("-m", "enigma_zero.rank", str(folder))
        except ChildFailedError as exc:
            raise RankFailedError(failure_message(exc, folder / ERRORS_DIR, config.nproc, out)) from None
        finally:
            relay.stop()
    return out


def failure_message(exc: object, errors: Path, world_size: int, out: Path) -> str:
    """Which rank failed, how, and where the run can continue from."""
    rank, failure = root_cause(exc, errors)
    reason = (errors / f"rank-{rank}.txt").read_text(encoding="utf-8").strip() if (
        errors / f"rank-{rank}.txt").is_file() else ""
    if not reason and failure.exitcode < 0:
        reason = f"killed by {failure.signal_name()}"
    elif not reason:
        raised = str(failure.message or "")
        reason = raised if raised and not raised.startswith("To enable traceback") else f"exit code {failure.exitcode}"
    checkpoint = latest_checkpoint(out)
    where = (f"the last checkpoint is {checkpoint}; continue with --resume" if checkpoint
             else "no checkpoint was written yet")
    return f"rank {rank} of {world_size} failed ({reason}); the other ranks were stopped; {where}"


def root_cause(exc: object, errors: Path) -> tuple[int, object]:
    """The rank that failed first of its own accord: one that explained its error, else one that was not
    stopped by the launcher's SIGTERM (sent to the others once a rank dies), else the earliest failure."""
    import signal

    failures = sorted(exc.failures.items(), key=lambda item: item[1].timestamp)  # type: ignore[attr-defined]
    for rank, failure in failures:
        if (errors / f"rank-{rank}.txt").is_file():
            return rank, failure
    for rank, failure in failures:
        if failure.exitcode != -signal.SIGTERM:
            return rank, failure
    return failures[0]


class ProgressRelay:
    """Reads the main rank's JSON-lines reports as they are appended and calls ``progress`` with each."""

    def __init__(self, path: Path, progress: ProgressCallback | None) -> None:
        self.path, self.progress = path, progress
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="enigma-zero-progress", daemon=True)
        self.offset = 0

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.drain()

    def run(self) -> None:
        while not self.stopping.wait(0.2):
            self.drain()

    def drain(self) -> None:
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode("utf-8").splitlines():
            if line.strip() and self.progress is not None:
                self.progress(TrainProgress(**json.loads(line)))


class ProgressWriter:
    """The main rank's progress callback: each report one JSON line in the launcher's file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, event: TrainProgress) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(attrs.asdict(event)) + "\n")
