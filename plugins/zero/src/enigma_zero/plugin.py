"""enigma-plugin-zero's hook: the ``zero`` trainer, which runs any builtin-loop method on several ranks."""

from __future__ import annotations

from enigma import Availability, hookimpl


def _available() -> Availability:
    import torch.distributed

    if torch.distributed.is_available():
        return Availability.yes()
    return Availability.no("this torch build has no torch.distributed")


@hookimpl
def enigma_register_trainers(register):
    register("zero", "enigma_zero.trainer:ZeroTrainer", available=_available,
             summary="runs --method on several ranks: data parallel, ZeRO-1 or ZeRO-2 (--nproc N --zero 2)")


@hookimpl
def enigma_register_executors(register):
    register("tensor-parallel", "enigma_zero.executor:TensorParallelExecutor", available=_available,
             summary="each layer split over N processes (tensor_parallel_size=N, enigma serve --tensor-parallel N)")
