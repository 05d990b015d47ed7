"""Where a training run's work happens: one process, or ranks of a torch.distributed job.

The builtin training loop (:class:`enigma.training.sft.SFTTrainer`) asks its
``distribution`` for everything that changes when training spans processes:
wrapping the model, building the optimizer, this rank's share of the
micro-batches, clipping, numbers averaged over ranks, checkpoints and the
final weights. :class:`SingleProcess` is the reference and the default;
``enigma-plugin-zero`` supplies data parallelism and ZeRO stages 1 and 2 on
torch.distributed through the same methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from enigma.training.checkpoint import load_checkpoint, save_checkpoint


class SingleProcess:
    """Training in this process alone."""

    rank = 0
    world_size = 1
    name = "single process"

    @property
    def is_main(self) -> bool:
        """Whether this rank reports progress and writes what every rank shares."""
        return self.rank == 0

    def shard_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as the loop trains it (wrapped for data parallelism or sharded)."""
        return model

    def make_optimizer(self, model: torch.nn.Module, build: Callable[[torch.nn.Module], torch.optim.Optimizer]
                       ) -> torch.optim.Optimizer:
        """The optimizer over ``model``'s trained parameters; ``build`` makes the single-process one."""
        return build(model)

    def micro_batches(self, batches: Iterator[Any]) -> Iterator[Any]:
        """This rank's micro-batches from the run's endless, ordered stream of them."""
        return batches

    def sync_gradients(self, model: torch.nn.Module, enabled: bool) -> None:
        """Called before each micro-batch's backward pass: whether ranks exchange its gradients (the
        step's last micro-batch) or only accumulate them."""

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)

    def mean(self, values: list[float]) -> list[float]:
        """``values`` averaged over the ranks (loss and metrics of a logging window)."""
        return values

    def total(self, value: float) -> float:
        """``value`` summed over the ranks (tokens processed)."""
        return value

    def optimizer_state_bytes(self, optimizer: torch.optim.Optimizer) -> list[int]:
        """Bytes of optimizer state (Adam's moments) each rank holds, by rank."""
        return [held_optimizer_bytes(optimizer)]

    def peak_memory_bytes(self) -> list[int]:
        """The most resident memory each rank's process has held so far, by rank."""
        return [peak_resident_bytes()]

    def save_checkpoint(self, out: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict[str, Any], *, keep: int) -> Path:
        """Write the checkpoint of ``step`` (weights, optimizer state and ``state``) atomically."""
        return save_checkpoint(out, step, model, {**state, "optimizer": optimizer.state_dict()}, keep=keep)

    def load_checkpoint(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
                        ) -> dict[str, Any]:
        """Restore weights and optimizer state from ``folder``; return the rest of its state."""
        state = load_checkpoint(folder, model)
        optimizer.load_state_dict(state.pop("optimizer"))
        return state

    def final_model(self, model: torch.nn.Module, rebuild: Callable[[], torch.nn.Module]) -> torch.nn.Module | None:
        """The trained model as one plain module on the main rank (None elsewhere); ``rebuild`` makes an
        untrained copy of it when the trained one is sharded."""
        return model

    def barrier(self) -> None:
        """Wait until every rank reaches this point."""

    def close(self) -> None:
        """Release what the distribution holds (process groups)."""


def peak_resident_bytes() -> int:
    """This process's peak resident set size (``getrusage``; 0 where it is not available)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def held_optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer state tensors held in this process."""
    return sum(local_bytes(value) for state in optimizer.state.values() for value in state.values()
               if isinstance(value, torch.Tensor))


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes of ``tensor`` held here: a DTensor's local shard, a plain tensor whole."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()
