"""The merge methods: mergekit's math, applied to the tensors of one name.

Each :class:`MergeMethod` names its parameters the way mergekit's YAML does
(``weight``, ``density``, ``t``, ``normalize``, ``int8_mask``, ``lambda``...)
with mergekit's defaults, and computes in the dtypes mergekit computes in, so
that a merge here equals ``mergekit-yaml``'s on the same models and config
(the tests hold it to 1e-6). Randomized methods (DARE, DELLA) draw from the
``torch.Generator`` they are given; the planner seeds one per tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch

REQUIRED = object()
"""The default of a parameter that has none: the config must give it."""

Parameters = Mapping[str, Any]


@attrs.frozen
class MergeMethod:
    """One way of combining the tensors that share a name."""

    name: str
    description: str
    function: Callable[..., torch.Tensor] = attrs.field(repr=False)
    """``function(tensors, base_index, shared, per_input, generator) -> tensor``; ``per_input[i]`` holds the
    parameters of ``tensors[i]`` (empty for the base where the method takes none for it)."""
    shared: Mapping[str, tuple[type, Any]] = attrs.field(factory=dict)
    """Parameters of the whole merge: name -> (type, default)."""
    per_input: Mapping[str, tuple[type, Any]] = attrs.field(factory=dict)
    """Parameters of each input model: name -> (type, default)."""
    base: str = "optional"
    """``"required"``, ``"optional"`` or ``"none"``: whether a base model takes part."""
    base_takes_parameters: bool = False
    """Whether the base model gets :attr:`per_input` parameters too (linear's weights do)."""
    min_inputs: int = 1
    max_inputs: int | None = None
    randomized: bool = False


def linear(tensors: Sequence[torch.Tensor], base_index: int | None, shared: Parameters,
           per_input: Sequence[Parameters], generator: torch.Generator | None) -> torch.Tensor:
    """Σ wᵢ·Wᵢ (divided by Σ wᵢ when ``normalize``), in float32."""
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = torch.tensor([p["weight"] for p in per_input], dtype=dtype)
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, weight in zip(tensors, weights.unbind(0)):
        result.addcmul_(tensor, weight)
    if shared["normalize"]:
        result.div_(weights.sum())
    return result.to(first.dtype)


def slerp(tensors: Sequence[torch.Tensor], base_index: int | None, shared: Parameters,
          per_input: Sequence[Parameters], generator: torch.Generator | None) -> torch.Tensor:
    """Spherical interpolation from the base (t = 0) to the other model (t = 1), over the whole
    flattened tensor; nearly parallel tensors (|cos| > 0.9995) are interpolated linearly."""
    v0, v1 = tensors[base_index], tensors[1 - base_index]
    return slerp_tensors(float(shared["t"]), v0, v1)


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dot_threshold: float = 0.9995,
                  eps: float = 1e-8) -> torch.Tensor:
    """SLERP between two tensors of one shape, computed in float32 (float64 inputs stay float64)."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(-1).to(dtype), v1.reshape(-1).to(dtype)
    if a.numel() == 0:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        coef_a, coef_b = 1 - t, t
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a, coef_b = torch.sin((1 - t) * theta) / sin_theta, torch.sin(t * theta) / sin_theta
    return (coef_a * a + coef_b * b).to(v0.dtype).reshape(v0.shape)


def multislerp(tensors: Sequence[torch.Tensor], base_index: int | None, shared: Parameters,
               per_input: Sequence[Parameters], generator: torch.Generator | None) -> torch.Tensor:
    """Weighted spherical interpolation of any number of models (barycentric on the hypersphere,
    through the tangent space at the weighted mean), about the base when there is one."""
    eps = 1e-8
    others = [i for i in range(len(tensors)) if i != base_index]
    if len(others) == 1:
        return tensors[others[0]]
    base = tensors[base_index] if base_index is not None else None
    stacked = torch.stack([tensors[i] for i in others], dim=0)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    weights = torch.tensor([per_input[i]["weight"] for i in others], dtype=stacked.dtype)
    if shared["normalize_weights"]:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] == 2:
            result = (stacked[0] * weights[0] + stacked[1] * weights[1]).view(stacked.shape[1:])
            return result + base if base is not None else result
        raise ValueError("the weighted sum of the models' tensors is zero (antipodal tensors whose weights "
                         "cancel out); choose other weights")
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * weights).sum()).view(stacked.shape[1:])
    return result + base if base is not None else result


def passthrough(tensors: Sequence[torch.Tensor], base_index: int | None, shared: Parameters,
                per_input: Sequence[Parameters], generator: torch.Generator | None) -> torch.Tensor:
    """The one input's tensor (times ``scale`` when given): stacking layers of models (frankenmerges)."""
    scale = per_input[0].get("scale")
    return tensors[0] if scale is None else tensors[0] * scale


# ------------------------------------------------------------------ sparsification

def rescaled_masked(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    """``tensor * mask``, scaled back to the tensor's L1 norm when ``rescale``."""
    masked = tensor * mask
    if not rescale:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def magnitude(tensor: torch.Tensor, density: float, rescale: bool, **_: Any) -> torch.Tensor:
    """Keep the ``density`` share of entries largest in absolute value (at least one)."""
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    magnitudes = tensor.abs().reshape(-1).float()
    mask[torch.argsort(magnitudes, descending=True)[:k]] = 1
    return rescaled_masked(tensor, mask.reshape_as(tensor), rescale)


def magnitude_outliers(tensor: torch.Tensor, density: float, rescale: bool, *, gamma: float = 0.01,
                       **_: Any) -> torch.Tensor:
    """Drop the ``gamma`` share of largest entries (outliers), then the smallest, keeping ``density``."""
    if density >= 1:
        return tensor
    count = tensor.numel()
    keep, top = int(density * count), int(gamma * count)
    bottom = max(0, count - keep - top)
    order = torch.sort(tensor.abs().reshape(-1).float(), descending=False).indices
    mask = torch.zeros(count, dtype=tensor.dtype)
    mask[order[bottom:bottom + keep]] = 1
    return rescaled_masked(tensor, mask.reshape_as(tensor), rescale)


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    # torch.bernoulli has no float16 kernel on the CPU
    return tensor.dtype if tensor.dtype == torch.bfloat16 else torch.float32


def bernoulli(tensor: torch.Tensor, density: float, rescale: bool, *, generator: torch.Generator | None = None,
              **_: Any) -> torch.Tensor:
    """DARE's drop: keep each entry with probability ``density``."""
    if density >= 1:
        return tensor
    work = _work_dtype(tensor)
    mask = torch.bernoulli(torch.full_like(tensor, density, dtype=work), generator=generator)
    return rescaled_masked(tensor.to(work), mask, rescale).to(tensor.dtype)


def della_magprune(tensor: torch.Tensor, density: float, rescale: bool, *, epsilon: float = 0.15,
                   generator: torch.Generator | None = None, **_: Any) -> torch.Tensor:
    """DELLA's drop: keep-probabilities from density - epsilon to density + epsilon by magnitude rank
    within each row."""
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"epsilon {epsilon} must keep density ± epsilon inside (0, 1) (density is {density})")
    shape, work = tensor.shape, _work_dtype(tensor)
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probabilities = (density - epsilon) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * epsilon
    mask = torch.bernoulli(probabilities, generator=generator).to(work)
    return rescaled_masked(rows.to(work), mask, rescale).to(tensor.dtype).reshape(shape)


# ------------------------------------------------------------------ task arithmetic

def task_arithmetic_family(sparsify: Callable[..., torch.Tensor] | None,
                           consensus: bool) -> Callable[..., torch.Tensor]:
    """The merge of task vectors (model - base): sparsified, weighted, sign-elected when ``consensus``
    (TIES), summed, optionally normalized by the weights, scaled by ``lambda`` and added to the base."""

    def merge(tensors: Sequence[torch.Tensor], base_index: int | None, shared: Parameters,
              per_input: Sequence[Parameters], generator: torch.Generator | None) -> torch.Tensor:
        base = tensors[base_index]
        others = [i for i in range(len(tensors)) if i != base_index]
        if not others:
            return base
        deltas = base.new_empty((len(others), *base.shape))
        for row, index in enumerate(others):
            delta = tensors[index] - base
            if sparsify is not None:
                extra = {key: per_input[index][key] for key in ("gamma", "epsilon") if key in per_input[index]}
                delta = sparsify(delta, density=per_input[index]["density"], rescale=shared["rescale"],
                                 generator=generator, **extra)
            deltas[row] = delta
        weights = torch.tensor([per_input[i]["weight"] for i in others], dtype=deltas.dtype)
        weights = weights.reshape(-1, *([1] * base.dim()))
        deltas.mul_(weights)
        if consensus:
            mask_dtype = torch.int8 if shared["int8_mask"] else base.dtype
            sign = deltas.sign().to(mask_dtype)
            majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
            mask = sign == majority
            mixed = (deltas * mask).sum(dim=0)
            divisor = (weights * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if shared["normalize"]:
            mixed /= divisor
        if shared["lambda"] != 1:
            mixed *= shared["lambda"]
        return (base + mixed).to(base.dtype)

    return merge


def _task_method(name: str, description: str, sparsify: Callable[..., torch.Tensor] | None, consensus: bool, *,
                 normalize: bool, rescale: bool, extra: Mapping[str, tuple[type, Any]] | None = None) -> MergeMethod:
    return MergeMethod(
        name, description, task_arithmetic_family(sparsify, consensus),
        shared={"int8_mask": (bool, False), "normalize": (bool, normalize), "rescale": (bool, rescale),
                "lambda": (float, 1.0)},
        per_input={"weight": (float, REQUIRED), "density": (float, 1.0), **(extra or {})},
        base="required", randomized=sparsify in (bernoulli, della_magprune))


METHODS: dict[str, MergeMethod] = {method.name: method for method in (
    MergeMethod("linear", "weighted average of the models (LERP)", linear,
                shared={"normalize": (bool, True)}, per_input={"weight": (float, REQUIRED)},
                base_takes_parameters=True),
    MergeMethod("slerp", "spherical interpolation from the base to one other model by t", slerp,
                shared={"t": (float, REQUIRED)}, base="required", min_inputs=2, max_inputs=2),
    MergeMethod("multislerp", "weighted spherical interpolation of any number of models", multislerp,
                shared={"normalize_weights": (bool, True)}, per_input={"weight": (float, REQUIRED)}),
    MergeMethod("passthrough", "one model's tensors unchanged (stack layers of models with slices)", passthrough,
                per_input={"scale": (float, None)}, base="none", base_takes_parameters=True, max_inputs=1),
    _task_method("task_arithmetic", "base + the weighted sum of task vectors (model - base)", None, False,
                 normalize=False, rescale=False),
    _task_method("ties", "task vectors trimmed to their largest entries (density), sign-elected, averaged",
                 magnitude, True, normalize=True, rescale=False),
    _task_method("dare_linear", "task vectors with entries dropped at random (density) and rescaled, summed",
                 bernoulli, False, normalize=False, rescale=True),
    _task_method("dare_ties", "DARE's random drop, then TIES' sign election", bernoulli, True,
                 normalize=False, rescale=True),
    _task_method("breadcrumbs", "task vectors without their smallest entries and largest outliers (gamma)",
                 magnitude_outliers, False, normalize=False, rescale=False, extra={"gamma": (float, 0.01)}),
    _task_method("breadcrumbs_ties", "breadcrumbs, then TIES' sign election", magnitude_outliers, True,
                 normalize=False, rescale=False, extra={"gamma": (float, 0.01)}),
    _task_method("della", "magnitude-ranked random drop (epsilon), TIES' sign election", della_magprune, True,
                 normalize=True, rescale=True, extra={"epsilon": (float, 0.15)}),
    _task_method("della_linear", "magnitude-ranked random drop (epsilon), summed", della_magprune, False,
                 normalize=False, rescale=True, extra={"epsilon": (float, 0.15)}),
)}
"""Every merge method by its mergekit name."""
