"""Quantization options of one Linear, their cost in bits, and the ladders the measurement tries.

A :class:`QParams` says: the first ``proportions[0]`` of the (salience-sorted)
rows get ``bits[0]`` bits in groups of ``group_sizes[0]`` rows, the next
share the next width, and so on — exllamav2's per-layer mixed bits. Its
:meth:`total_bits` counts what the tensors take on disk (weights, scale codes,
the per-group maximum and table entry, the permutation), the figure the
optimiser spends a budget of.

The ladders are enigma's own: for each block of a decoder layer (attention,
MLP) a rising list of options from about 2.3 to 8.2 bits per weight, where
each rung gives every projection the same recipe, or the most sensitive one
(``v_proj``, ``down_proj``) the next rung's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from enigma.errors import BadRequestError
from enigma_exl2.layout import BIT_WIDTHS, SCALE_BITS, packed_rows


@attrs.frozen
class QParams:
    """Mixed-bit recipe of one Linear."""

    bits: tuple[int, ...]
    proportions: tuple[float, ...]
    group_sizes: tuple[int, ...]

    def __attrs_post_init__(self) -> None:
        if not (len(self.bits) == len(self.proportions) == len(self.group_sizes)) or not self.bits:
            raise BadRequestError("QParams needs one proportion and one group size per bit width")
        if any(b not in BIT_WIDTHS for b in self.bits):
            raise BadRequestError(f"EXL2 bit widths are {BIT_WIDTHS}; got {self.bits}")
        if abs(sum(self.proportions) - 1) > 1e-6 or any(p <= 0 for p in self.proportions):
            raise BadRequestError(f"proportions must be positive and sum to 1; got {self.proportions}")
        if any(g <= 0 or g % 32 for g in self.group_sizes):
            raise BadRequestError(f"group sizes must be multiples of 32; got {self.group_sizes}")

    def groups(self, rows: int) -> list[tuple[int, int]]:
        """``(bits, rows)`` of each group over ``rows`` rows, in order (exllamav2's rounding: each width takes
        whole groups covering its share; the last group of all ends at ``rows``)."""
        out: list[tuple[int, int]] = []
        remaining = rows
        for bits, share, size in zip(self.bits, self.proportions, self.group_sizes):
            count = math.ceil(min(rows * share, remaining) / size)
            for _ in range(count):
                taken = min(size, remaining)
                if taken > 0:
                    out.append((bits, taken))
                remaining -= taken
        if remaining > 0:  # rounding left rows over: the last width takes them
            bits, size = self.bits[-1], self.group_sizes[-1]
            while remaining > 0:
                taken = min(size, remaining)
                out.append((bits, taken))
                remaining -= taken
        return out

    def total_bits(self, rows: int, columns: int) -> int:
        """Bits the Linear's tensors take: weights (padded columns), scale codes, scale maxima, group table,
        permutation."""
        padded = -(-columns // 32) * 32
        groups = self.groups(rows)
        weights = sum(packed_rows(r, b) * 32 for b, r in groups) * padded
        return weights + len(groups) * (16 + 32 + padded * SCALE_BITS) + rows * 32

    def bpw(self, rows: int, columns: int) -> float:
        return self.total_bits(rows, columns) / (rows * columns)

    @property
    def description(self) -> str:
        parts = [f"{p:g}:{b}b/{g}g" for b, p, g in zip(self.bits, self.proportions, self.group_sizes)]
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"bits": list(self.bits), "proportions": list(self.proportions), "group_sizes": list(self.group_sizes)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QParams:
        return cls(tuple(int(b) for b in data["bits"]), tuple(float(p) for p in data["proportions"]),
                   tuple(int(g) for g in data["group_sizes"]))


def _q(bits: Sequence[int], proportions: Sequence[float], group: int | Sequence[int]) -> QParams:
    sizes = (group,) * len(bits) if isinstance(group, int) else tuple(group)
    return QParams(tuple(bits), tuple(proportions), sizes)


RUNGS = (
    _q([3, 2], [0.05, 0.95], 64),
    _q([3, 2], [0.25, 0.75], 64),
    _q([4, 3, 2], [0.1, 0.4, 0.5], 64),
    _q([4, 3], [0.1, 0.9], 128),
    _q([4, 3], [0.3, 0.7], 64),
    _q([4], [1.0], 128),
    _q([4], [1.0], 32),
    _q([5, 4], [0.1, 0.9], 128),
    _q([5, 4], [0.3, 0.7], 64),
    _q([5], [1.0], 64),
    _q([6, 5], [0.1, 0.9], 128),
    _q([6, 5], [0.3, 0.7], 64),
    _q([6], [1.0], 128),
    _q([8, 6], [0.1, 0.9], 128),
    _q([8, 6], [0.3, 0.7], 64),
    _q([8], [1.0], 128),
)
"""One recipe per rung, about 2.3 to 8.2 bits per weight on a 256-row Linear (fewer on larger ones: the
permutation and tables weigh less)."""

HEAD_OPTIONS = {
    2: _q([4, 2], [0.3, 0.7], 32),
    3: _q([4, 3], [0.15, 0.85], 32),
    4: _q([6, 4], [0.15, 0.85], 32),
    5: _q([6, 5], [0.15, 0.85], 128),
    6: _q([8, 6], [0.15, 0.85], 128),
    8: _q([8], [1.0], 128),
}
"""``--head-bits`` choices for the output head (exllamav2's head recipes)."""

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SENSITIVE = {"attention": "v_proj", "mlp": "down_proj"}


def block_options(block: str) -> list[dict[str, QParams]]:
    """The options the measurement tries for a layer's ``attention`` or ``mlp``: per option, a recipe per
    projection."""
    names = ATTENTION if block == "attention" else MLP
    sensitive = SENSITIVE[block]
    options = []
    for index, rung in enumerate(RUNGS):
        options.append(dict.fromkeys(names, rung))
        if index + 2 < len(RUNGS):
            options.append({**dict.fromkeys(names, rung), sensitive: RUNGS[index + 2]})
    return options
