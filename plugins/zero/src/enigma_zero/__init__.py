"""enigma-plugin-zero: training past one process — data parallel, ZeRO-1 and ZeRO-2 on torch.distributed.

``enigma train ... --nproc 2 --zero 2`` starts two ranks on this machine;
under ``torchrun`` (several machines) each process it starts trains as a
rank. Stage 0 replicates everything and all-reduces gradients (torch's
composable DDP); stage 1 partitions Adam's state (``ZeroRedundancyOptimizer``);
stage 2 also shards the gradients (FSDP2's ``fully_shard`` with
``reshard_after_forward=False``). The seed's call maps to
:func:`create_zero_optimizer`; whole runs are ``TrainConfig(zero=2, nproc=2)``
through :func:`enigma.training.train`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_zero_optimizer"]


def create_zero_optimizer(model: Any, lr: float = 1e-4, stage: int = 2, **adamw: Any) -> Any:
    """AdamW over ``model`` with ZeRO ``stage`` (1 or 2), inside an initialized process group.

    For your own training loop: stage 2 shards ``model`` in place (FSDP2, each
    decoder layer and the root) and returns an AdamW over its shards; stage 1
    returns a ``ZeroRedundancyOptimizer`` over AdamW, and your loop averages
    gradients across ranks (wrap the model in ``DistributedDataParallel``).
    """
    import torch
    import torch.distributed as dist

    from enigma.errors import ConfigError

    if not dist.is_initialized():
        raise ConfigError("create_zero_optimizer needs a process group: call torch.distributed.init_process_group "
                          "first (torchrun sets its environment)")
    if stage == 2:
        from enigma_zero.sharding import shard_zero2

        shard_zero2(model)
        return torch.optim.AdamW(model.parameters(), lr=lr, **adamw)
    if stage == 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=lr, **adamw)
    raise ConfigError(f"create_zero_optimizer(stage={stage!r}): stages are 1 and 2")
