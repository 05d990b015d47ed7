"""What a trainer reports while it runs; the CLI draws it as a progress bar."""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs


@attrs.frozen(kw_only=True)
class TrainProgress:
    """One report: ``event`` is ``start``, ``step``, ``eval``, ``save`` or ``done``."""

    event: str
    step: int
    total_steps: int
    loss: float | None = None
    """Mean training loss since the previous ``step`` report."""
    lr: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    val_loss: float | None = None
    path: str | None = None
    """The checkpoint (``save``) or final model folder (``done``)."""
    message: str | None = None
    metrics: dict[str, float] = attrs.field(factory=dict)
    """A trainer's further numbers since the previous ``step`` report (DPO's ``rewards/margins``...)."""

    @property
    def val_perplexity(self) -> float | None:
        return None if self.val_loss is None else math.exp(min(self.val_loss, 50.0))


ProgressCallback = Callable[[TrainProgress], None]
