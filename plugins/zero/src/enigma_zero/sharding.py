"""The distributions a rank trains under: data parallel (stage 0), ZeRO-1 and ZeRO-2.

All three keep the builtin loop's arithmetic: rank ``r`` of ``W`` takes
micro-batches ``r, r + W, r + 2W, ...`` of the run's one ordered stream, and
gradients are averaged over the ranks, so ``W`` ranks with ``grad_accum A``
step exactly as one process with ``grad_accum A·W`` does.

- stage 0: parameters, gradients and optimizer state replicated; gradients
  all-reduced once per optimizer step (torch's composable DDP, ``replicate``).
- stage 1: the same, with the optimizer state partitioned over the ranks
  (``ZeroRedundancyOptimizer``: each rank steps the parameters it owns and
  broadcasts them).
- stage 2: FSDP2's ``fully_shard(reshard_after_forward=False)`` per decoder
  layer and on the root: gradients are reduce-scattered as they are made, so
  each rank keeps 1/W of them and of the optimizer state; parameters are
  gathered once per step and stay whole from forward through backward.
"""

from __future__ import annotations

import inspect
import itertools
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from enigma.errors import ConfigError
from enigma.fsutil import atomic_write_text, default_dir_mode
from enigma.training.checkpoint import LATEST, checkpoints_dir, load_checkpoint, trained_parameters
from enigma.training.distribution import SingleProcess, held_optimizer_bytes, peak_resident_bytes

OPTIMIZER_DIR = "optimizer"
"""Inside a checkpoint: the sharded optimizer state (torch.distributed.checkpoint's files, or one file per rank)."""


class DataParallel(SingleProcess):
    """Stage 0: everything replicated, gradients all-reduced."""

    stage = 0

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.name = f"ZeRO-{self.stage} on {self.world_size} ranks ({dist.get_backend()})"

    def shard_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed._composable.replicate import replicate

        replicate(model)
        return model

    def micro_batches(self, batches: Iterator[Any]) -> Iterator[Any]:
        return itertools.islice(batches, self.rank, None, self.world_size)

    def sync_gradients(self, model: torch.nn.Module, enabled: bool) -> None:
        model.set_requires_gradient_sync(enabled)  # all-reduce after the step's last micro-batch only

    def mean(self, values: list[float]) -> list[float]:
        return [value / self.world_size for value in self._sum(values)]

    def total(self, value: float) -> float:
        return self._sum([value])[0]

    def _sum(self, values: list[float]) -> list[float]:
        if not values:
            return []
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    device = torch.device("cpu")
    """Where the loop's numbers are exchanged (gloo; the builtin loop trains on the CPU)."""

    def optimizer_state_bytes(self, optimizer: torch.optim.Optimizer) -> list[int]:
        return self._gather(self._held(optimizer))

    def peak_memory_bytes(self) -> list[int]:
        return self._gather(peak_resident_bytes())

    def _gather(self, value: int) -> list[int]:
        held = torch.tensor([value], dtype=torch.int64, device=self.device)
        every = [torch.zeros_like(held) for _ in range(self.world_size)]
        dist.all_gather(every, held)
        return [int(t.item()) for t in every]

    def _held(self, optimizer: torch.optim.Optimizer) -> int:
        return held_optimizer_bytes(optimizer)

    def save_checkpoint(self, out: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict[str, Any], *, keep: int) -> Path:
        """Every rank writes its share of the optimizer state, the main rank the weights and the rest, into
        a staging folder renamed into place once all have written: a job killed at any moment leaves the
        previous checkpoint whole."""
        root = checkpoints_dir(out)
        final, staging = root / f"step-{step:07d}", root / f".step-{step:07d}.partial"
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(mode=default_dir_mode())
            (staging / OPTIMIZER_DIR).mkdir()
        self.barrier()
        try:
            weights = self.full_trained_weights(model)
            self.save_optimizer(optimizer, model, staging / OPTIMIZER_DIR)
            if self.is_main:
                from safetensors.torch import save_file

                save_file(weights, str(staging / "model.safetensors"))
                torch.save({**state, "world_size": self.world_size, "zero": self.stage}, staging / "state.pt")
            self.barrier()
        except BaseException:
            if self.is_main:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if self.is_main:
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
            atomic_write_text(root / LATEST, final.name + "\n")
            for old in sorted(root.glob("step-*"))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return final

    def load_checkpoint(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
                        ) -> dict[str, Any]:
        state = torch.load(folder / "state.pt", weights_only=True)
        saved = (state.get("zero"), state.get("world_size"))
        if saved[0] is None:
            raise ConfigError(f"checkpoint {folder} was written by a single-process run; resume it without "
                              "--nproc/--zero, or start over")
        if saved[0] != self.stage or (self.stage < 2 and saved[1] != self.world_size):
            raise ConfigError(f"checkpoint {folder} was written with --zero {saved[0]} on {saved[1]} ranks; "
                              f"resume it with the same (this run: --zero {self.stage} on {self.world_size})")
        self.load_trained_weights(folder, model)
        self.load_optimizer(optimizer, model, folder / OPTIMIZER_DIR)
        return state

    def full_trained_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The trained parameters, whole, by name (on the main rank; every rank must call it)."""
        return {name: p.detach().cpu().contiguous() for name, p in trained_parameters(model).items()}

    def load_trained_weights(self, folder: Path, model: torch.nn.Module) -> None:
        load_checkpoint(folder, model)  # the single-process loop's reader (state.pt is read by the caller)

    def save_optimizer(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, folder: Path) -> None:
        if self.is_main:  # replicated: one copy is the whole state
            torch.save(optimizer.state_dict(), folder / "rank-0.pt")

    def load_optimizer(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, folder: Path) -> None:
        optimizer.load_state_dict(torch.load(folder / "rank-0.pt", weights_only=True))

    def final_model(self, model: torch.nn.Module, rebuild: Callable[[], torch.nn.Module]) -> torch.nn.Module | None:
        return model if self.is_main else None

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class ZeroStage1(DataParallel):
    """Stage 1: gradients all-reduced, optimizer state partitioned (``ZeroRedundancyOptimizer``)."""

    stage = 1

    def make_optimizer(self, model: torch.nn.Module, build: Callable[[torch.nn.Module], torch.optim.Optimizer]
                       ) -> torch.optim.Optimizer:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        template = build(model)
        groups = [{"params": group["params"], "weight_decay": group["weight_decay"]}
                  for group in template.param_groups if group["params"]]
        accepted = inspect.signature(type(template)).parameters
        defaults = {key: value for key, value in template.defaults.items()
                    if key in accepted and key not in ("fused", "weight_decay")}
        return ZeroRedundancyOptimizer(groups, optimizer_class=type(template), **defaults)

    def _held(self, optimizer: torch.optim.Optimizer) -> int:
        return held_optimizer_bytes(optimizer.optim)

    def save_optimizer(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, folder: Path) -> None:
        torch.save(optimizer.optim.state_dict(), folder / f"rank-{self.rank}.pt")

    def load_optimizer(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, folder: Path) -> None:
        local = torch.load(folder / f"rank-{self.rank}.pt", weights_only=True)
        optimizer.optim.load_state_dict(local)
        for group, restored in zip(optimizer.param_groups, optimizer.optim.param_groups):
            group.update({key: value for key, value in restored.items() if key != "params"})


class ZeroStage2(DataParallel):
    """Stage 2: FSDP2 with parameters whole from forward to backward, gradients and optimizer state sharded."""

    stage = 2

    def shard_model(self, model: torch.nn.Module) -> torch.nn.Module:
        with torch.no_grad():  # every rank shards the main rank's weights (as DDP starts from them)
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=0)
        return shard_zero2(model)

    def sync_gradients(self, model: torch.nn.Module, enabled: bool) -> None:
        """Gradients are reduce-scattered after every micro-batch, so each rank accumulates only its
        1/W of them (FSDP2's default; skipping the sync would hold whole gradients, as stage 0 does)."""

    def full_trained_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        trained = trained_parameters(model)
        return {name: tensor.contiguous() for name, tensor in whole.items() if name in trained}

    def load_trained_weights(self, folder: Path, model: torch.nn.Module) -> None:
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        saved = load_file(str(folder / "model.safetensors"))
        expected = trained_parameters(model)
        if set(saved) != set(expected):
            raise ConfigError(f"checkpoint {folder} trained other parameters than this run does; "
                              "start over without --resume")
        set_model_state_dict(model, saved, options=StateDictOptions(full_state_dict=True, strict=False))

    def save_optimizer(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(folder))

    def load_optimizer(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=str(folder))
        set_optimizer_state_dict(model, optimizer, state["optimizer"])

    def final_model(self, model: torch.nn.Module, rebuild: Callable[[], torch.nn.Module]) -> torch.nn.Module | None:
        """Gathered into a rebuilt, unsharded copy on the main rank (every rank takes part in the gather)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        plain = rebuild()
        missing, unexpected = plain.load_state_dict(whole, strict=False)
        if unexpected or [name for name in missing if name in dict(plain.named_parameters())]:
            raise RuntimeError(f"the trained model's weights do not fit a fresh copy of it (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
        return plain


def shard_zero2(model: torch.nn.Module) -> torch.nn.Module:
    """Shard ``model`` in place for ZeRO-2: ``fully_shard(reshard_after_forward=False)`` on each decoder layer
    (one all-gather and one reduce-scatter per layer, overlapping the next layer's compute) and on the rest."""
    from torch.distributed.fsdp import fully_shard

    for layer in getattr(model, "layers", ()):
        fully_shard(layer, reshard_after_forward=False)
    fully_shard(model, reshard_after_forward=False)
    return model


STAGES = {0: DataParallel, 1: ZeroStage1, 2: ZeroStage2}


def distribution_for(stage: int) -> DataParallel:
    """The distribution of ZeRO ``stage`` in the initialized default process group."""
    return STAGES[stage]()


__all__ = ["STAGES", "DataParallel", "ZeroStage1", "ZeroStage2", "distribution_for", "shard_zero2"]
