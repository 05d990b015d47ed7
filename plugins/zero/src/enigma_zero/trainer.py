"""The ``zero`` trainer: a training method (``--method``, default ``sft``) run as ranks of a torch.distributed job.

Three ways in, one code path per rank:

- ``enigma train ... --nproc N [--zero S]``: this process starts N ranks on
  this machine with torch's elastic launcher (what ``torchrun`` runs), relays
  the main rank's progress and reports a failed rank by number;
- ``torchrun ... -m enigma_cli train ... --zero S`` (any number of nodes): each
  process torchrun starts is already a rank and trains as one;
- ``--zero S`` alone: one rank in this process (the sharded code path on one
  process; what ``--nproc 1`` means).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs

from enigma.errors import ConfigError
from enigma.training.config import TrainConfig
from enigma.training.progress import ProgressCallback


def launched_as_rank() -> bool:
    """Whether this process is a rank a launcher started (torchrun's environment is set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class ZeroTrainer:
    """Runs ``config.trainer`` under :mod:`enigma_zero.sharding`'s distribution of ``config.zero``."""

    def train(self, config: TrainConfig, *, progress: ProgressCallback | None = None) -> Path:
        if launched_as_rank():
            return run_rank(config, progress)
        if config.nproc > 1:
            from enigma_zero.launch import launch

            return launch(config, progress)
        return run_single_rank(config, progress)


def backend() -> str:
    """gloo for CPU tensors, and NCCL for CUDA ones where CUDA is present."""
    import torch

    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def run_single_rank(config: TrainConfig, progress: ProgressCallback | None) -> Path:
    """A job of one rank in this process (a free local port as its rendezvous)."""
    import torch.distributed as dist

    from enigma_zero.launch import free_port

    dist.init_process_group(backend(), init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    return run_rank(config, progress)


def run_rank(config: TrainConfig, progress: ProgressCallback | None) -> Path:
    """Train as this process's rank: join the job, run the method with the stage's distribution, leave."""
    import torch
    import torch.distributed as dist

    from enigma.plugins import get_host
    from enigma.training import trainer_options
    from enigma.training.sft import SFTTrainer
    from enigma_zero.sharding import distribution_for

    method = "sft" if config.trainer == "zero" else config.trainer
    implementation = get_host().select("trainer", method)
    trainer = implementation.create()
    if not isinstance(trainer, SFTTrainer):
        raise ConfigError(f"trainer {method!r} runs a training loop of its own; --nproc and --zero work with "
                          "trainers built on enigma's loop (sft, lora, dpo)")
    options = trainer_options(implementation, config.options)
    if not dist.is_initialized():
        dist.init_process_group(backend())
    try:
        if config.threads is None:
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
        trainer.distribution = distribution_for(config.zero)
        return Path(trainer.train(attrs.evolve(config, trainer=method, options=options), progress=progress))
    finally:
        dist.destroy_process_group()


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from :meth:`TrainConfig.to_dict` (how the launcher hands it to the ranks)."""
    import cattrs

    return cattrs.structure(values, TrainConfig)
