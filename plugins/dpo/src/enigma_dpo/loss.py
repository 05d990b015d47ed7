"""The DPO objective and its logged numbers, as TRL 1.16 computes them (``DPOTrainer._compute_loss``).

Inputs are per pair: the policy's and the reference's summed log-probabilities
of the chosen and the rejected completion (prompt tokens excluded), and the
completions' lengths (IPO averages per token). With
``Δ = (chosen − ref_chosen) − (rejected − ref_rejected)``:

``sigmoid``  −log σ(β Δ)                (Rafailov et al. 2023)
``hinge``    max(0, 1 − β Δ)             (SLiC)
``ipo``      (Δ̄ − 1 / 2β)², Δ̄ from per-token averages (Azar et al. 2023)

Rewards are ``β · (logps − ref_logps)``; the metrics carry TRL's names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from enigma.errors import BadRequestError
from enigma_dpo.options import LOSS_TYPES


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
             chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean loss over the pairs, and ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (means over the pairs)."""
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (chosen_logratios - rejected_logratios))
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise BadRequestError("the ipo loss needs the completions' lengths")
        delta = (chosen_logratios / chosen_lengths.clamp(min=1.0)
                 - rejected_logratios / rejected_lengths.clamp(min=1.0))
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise BadRequestError(f"unknown DPO loss {loss_type!r}; choose {', '.join(LOSS_TYPES)}")
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    metrics = {"rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
               "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
               "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
               "logps/chosen": chosen_logps.detach().mean().item(),
               "logps/rejected": rejected_logps.detach().mean().item()}
    return losses.mean(), metrics


def completion_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Per sequence, the summed log-probability of its completion tokens: ``logits`` ``[n, seq, vocab]``
    predict ``input_ids`` ``[n, seq]`` shifted by one; ``completion_mask`` marks completion tokens."""
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(logits.dtype)
    per_token = -F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                 reduction="none").view(targets.shape)
    return (per_token * mask).sum(dim=1)
