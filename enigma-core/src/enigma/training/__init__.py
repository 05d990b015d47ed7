"""Training: the data pipeline's consumer, the reference ``sft`` trainer and its parts.

``train(config)`` runs the trainer that ``config.trainer`` names (``sft`` by
default; plugins add ``lora``, ``dpo``...) through the kernel's registry.
"""

from __future__ import annotations

from pathlib import Path

from enigma.training.config import TrainConfig, load_train_config
from enigma.training.progress import ProgressCallback, TrainProgress

__all__ = ["TrainConfig", "TrainProgress", "load_train_config", "train"]


def train(config: TrainConfig, *, progress: ProgressCallback | None = None) -> Path:
    """Run the trainer ``config.trainer`` names; return the final model folder."""
    from enigma.plugins import get_host

    trainer = get_host().create("trainer", config.trainer)
    return Path(trainer.train(config, progress=progress))
