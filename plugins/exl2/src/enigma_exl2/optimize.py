"""Choosing each block's option so the decoder reaches a bits-per-weight budget with the least error.

exllamav2 anneals; the problem is a multiple-choice knapsack, small enough
(two blocks per layer, a few dozen options each) to solve exactly by dynamic
programming over the budget cut into fine units: minimise ``Σ (1 - accuracy)``
over the blocks subject to ``Σ bits ≤ budget``. Costs round up, so the
result never exceeds the budget; the resolution keeps it within a hair of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from enigma.errors import BadRequestError

RESOLUTION = 4000
"""Budget units; the chosen bits fall short of the budget by at most blocks/RESOLUTION of it."""


def choose(blocks: Sequence[Sequence[dict[str, Any]]], budget_bits: float) -> list[int]:
    """For each block (a list of options with ``total_bits`` and ``accuracy``), the index of its option."""
    unit = budget_bits / RESOLUTION
    cheapest = sum(min(o["total_bits"] for o in options) for options in blocks)
    if cheapest > budget_bits:
        raise BadRequestError(f"the budget of {budget_bits:.0f} bits is below the smallest choice measured "
                              f"({cheapest:.0f} bits); raise --bpw")
    best = np.zeros(RESOLUTION + 1)                  # least error using at most u units, over blocks so far
    picks = []
    for options in blocks:
        costs = [int(np.ceil(o["total_bits"] / unit - 1e-9)) for o in options]
        errors = [1.0 - float(o["accuracy"]) for o in options]
        candidate = np.full((len(options), RESOLUTION + 1), np.inf)
        for index, (cost, error) in enumerate(zip(costs, errors)):
            if cost <= RESOLUTION:
                candidate[index, cost:] = best[:RESOLUTION + 1 - cost] + error
        choice = np.argmin(candidate, axis=0)
        best = candidate[choice, np.arange(RESOLUTION + 1)]
        picks.append((choice, costs))
    if not np.isfinite(best[RESOLUTION]):
        raise BadRequestError("no combination of the measured options fits the budget; raise --bpw")
    chosen, units = [], RESOLUTION
    for choice, costs in reversed(picks):
        index = int(choice[units])
        chosen.append(index)
        units -= costs[index]
    return chosen[::-1]
