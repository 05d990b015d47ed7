"""Planning a merge: which input tensors make each output tensor, with which parameters.

Tensor names are split into a layer stack (``model.layers.<i>.<rest>``) and
the rest: tensors before the layers (embeddings, from the first slice's
models) and after them (final norm, LM head, from the last slice's). Output
layers are numbered in slice order. Every input tensor's shape and dtype is
checked here, before anything is computed, so a bad merge fails at once and
names the tensor.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from enigma.errors import BadRequestError
from enigma.merging.config import MergeConfig, SliceSource, resolve
from enigma.merging.methods import MergeMethod

logger = logging.getLogger("enigma.merging")

LAYER_NAME = re.compile(r"^(?P<stack>.+?)\.(?P<index>\d+)\.(?P<rest>.+)$")
BEFORE_LAYERS = ("embed", "wte", "wpe", "word_embeddings")
"""Name fragments of the tensors that come before the layer stack."""


@attrs.define
class OpenModel:
    """An input model, its tensors opened memory-mapped."""

    reference: str
    folder: Path
    hf_config: dict[str, Any]
    weights: Any
    stack: str | None = None
    layers: dict[int, list[str]] = attrs.field(factory=dict)
    """Per layer index, the names after ``<stack>.<index>.``, in file order."""
    outside: list[str] = attrs.field(factory=list)
    """Names not in the layer stack, in file order."""

    def __attrs_post_init__(self) -> None:
        for name in self.weights.keys():
            match = LAYER_NAME.match(name)
            if match and (self.stack is None or match["stack"] == self.stack):
                self.stack = match["stack"]
                self.layers.setdefault(int(match["index"]), []).append(match["rest"])
            else:
                self.outside.append(name)

    @property
    def num_layers(self) -> int:
        return max(self.layers) + 1 if self.layers else 0


@attrs.frozen
class TensorTask:
    """One output tensor: its inputs (model index, tensor name), parameters and dtypes."""

    output: str
    inputs: tuple[tuple[int, str], ...]
    base_index: int | None
    shared: Mapping[str, Any]
    per_input: tuple[Mapping[str, Any], ...]
    shape: tuple[int, ...]
    compute_dtype: torch.dtype
    out_dtype: torch.dtype


@attrs.frozen
class MergePlan:
    tasks: list[TensorTask]
    models: list[OpenModel]
    num_layers: int
    reference: OpenModel
    """The model whose config.json the result takes (the base, else the first)."""


def plan_merge(config: MergeConfig, method: MergeMethod, models: Mapping[str, OpenModel]) -> MergePlan:
    """Every output tensor of ``config``, checked against the opened ``models``."""
    order = list(models)
    reference = models[config.base_model] if config.base_model else models[config.slices[0].sources[0].model]
    _check_architectures(reference, list(models.values()))
    known = set(method.shared) | set(method.per_input)
    _warn_unknown_parameters(config, known)
    dtype = _dtype(config.dtype, "dtype")
    out_dtype = _dtype(config.out_dtype, "out_dtype")
    tasks: list[TensorTask] = []
    slices = [_slice_sources(config, method, output, models) for output in config.slices]

    def add(output_name: str, sources: Sequence[SliceSource], input_names: Sequence[str], base: str | None,
            slice_parameters: Mapping[str, Any], t: float) -> None:
        base_index = next((i for i, s in enumerate(sources) if s.model == base), None)
        shared = {name: resolve(name, kind, default, [slice_parameters, config.parameters],
                                tensor_name=output_name, t=t, where=f"the merge ({method.name})")
                  for name, (kind, default) in method.shared.items()}
        per_input = []
        for index, source in enumerate(sources):
            if index == base_index and not method.base_takes_parameters:
                per_input.append({})
                continue
            scopes = [s.parameters for s in sources if s.model == source.model]
            per_input.append({name: resolve(name, kind, default, [*scopes, slice_parameters, config.parameters],
                                            tensor_name=input_names[index], t=t, where=f"model {source.model}")
                              for name, (kind, default) in method.per_input.items()})
        inputs = tuple((order.index(s.model), n) for s, n in zip(sources, input_names))
        shape, compute = _check_inputs(output_name, [(models[s.model], n) for s, n in zip(sources, input_names)],
                                       dtype)
        out = compute if not compute.is_floating_point else (out_dtype or compute)
        tasks.append(TensorTask(output_name, inputs, base_index, shared, tuple(per_input), shape, compute, out))

    first_sources, first_base, first_parameters = slices[0]
    for name in reference.outside:
        if not any(marker in name for marker in BEFORE_LAYERS):
            continue
        add(name, first_sources, [name] * len(first_sources), first_base, first_parameters, 0.0)
    out_layer = 0
    for sources, base, parameters in slices:
        length = sources[0].layer_range[1] - sources[0].layer_range[0]
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            lead = models[sources[0].model]
            rests = lead.layers.get(sources[0].layer_range[0] + offset)
            if rests is None:
                raise BadRequestError(f"model {lead.reference} has no layer {sources[0].layer_range[0] + offset} "
                                      f"(it has {lead.num_layers}); fix the layer_range")
            for rest in rests:
                names = [f"{models[s.model].stack}.{s.layer_range[0] + offset}.{rest}" for s in sources]
                add(f"{lead.stack}.{out_layer}.{rest}", sources, names, base, parameters, t)
            out_layer += 1
    last_sources, last_base, last_parameters = slices[-1]
    for name in reference.outside:
        if any(marker in name for marker in BEFORE_LAYERS):
            continue
        add(name, last_sources, [name] * len(last_sources), last_base, last_parameters, 0.0)
    return MergePlan(tasks=tasks, models=[models[name] for name in order], num_layers=out_layer,
                     reference=reference)


def _slice_sources(config: MergeConfig, method: MergeMethod, output: Any, models: Mapping[str, OpenModel],
                   ) -> tuple[list[SliceSource], str | None, Mapping[str, Any]]:
    base = output.base_model or config.base_model
    sources = list(output.sources)
    if config.whole_models:
        sources = [attrs.evolve(s, layer_range=(0, models[s.model].num_layers)) for s in sources]
        if base and all(s.model != base for s in sources):
            sources.append(SliceSource(base, (0, models[base].num_layers)))
    lengths = {s.model: s.layer_range[1] - s.layer_range[0] for s in sources}
    if len(set(lengths.values())) > 1:
        raise BadRequestError("every source of a slice must span the same number of layers; got "
                              + ", ".join(f"{m}: {n}" for m, n in lengths.items()))
    for source in sources:
        available = models[source.model].num_layers
        if source.layer_range[1] > available:
            raise BadRequestError(f"layer_range {list(source.layer_range)} of {source.model} is past its "
                                  f"{available} layers")
    if method.base == "required" and (base is None or all(s.model != base for s in sources)):
        raise BadRequestError(f"merge method {method.name} needs a base_model among its models")
    if method.base == "none":
        base = None
    count = len(sources)
    if count < method.min_inputs or (method.max_inputs is not None and count > method.max_inputs):
        wanted = (f"exactly {method.min_inputs}" if method.max_inputs == method.min_inputs else
                  f"at most {method.max_inputs}" if method.max_inputs else f"at least {method.min_inputs}")
        raise BadRequestError(f"merge method {method.name} takes {wanted} model(s) per slice, base included; "
                              f"got {count} ({', '.join(s.model for s in sources)})")
    return sources, base, output.parameters


def _check_inputs(output: str, inputs: Sequence[tuple[OpenModel, str]],
                  dtype: torch.dtype | None) -> tuple[tuple[int, ...], torch.dtype]:
    shapes, dtypes = [], []
    for model, name in inputs:
        if name not in model.weights:
            raise BadRequestError(f"model {model.reference} has no tensor {name!r} (needed for {output}); the "
                                  "models must share an architecture")
        shapes.append(tuple(model.weights.shape(name)))
        dtypes.append(model.weights.dtype(name))
    if len(set(shapes)) > 1:
        found = ", ".join(f"{model.reference}: {list(shape)}" for (model, _), shape in zip(inputs, shapes))
        raise BadRequestError(f"tensor {output} has different shapes in the models ({found}); only models of one "
                              "architecture and size can be merged")
    compute = dtypes[0]
    for found in dtypes[1:]:
        compute = torch.promote_types(compute, found)
    if compute.is_floating_point and dtype is not None:
        compute = dtype
    return shapes[0], compute


def _check_architectures(reference: OpenModel, models: Sequence[OpenModel]) -> None:
    wanted = reference.hf_config.get("architectures")
    for model in models:
        found = model.hf_config.get("architectures")
        if found != wanted:
            raise BadRequestError(f"model {model.reference} is {found} but {reference.reference} is {wanted}; "
                                  "only models of one architecture can be merged")


def _dtype(name: str | None, key: str) -> torch.dtype | None:
    if name is None:
        return None
    from enigma.dtypes import torch_dtype

    try:
        return torch_dtype(name)
    except KeyError:
        raise BadRequestError(f"merge config {key}: {name!r} is not a dtype; use float32, float16 or "
                              "bfloat16") from None


def _warn_unknown_parameters(config: MergeConfig, known: set[str]) -> None:
    given = set(config.parameters)
    for output in config.slices:
        given |= set(output.parameters)
        for source in output.sources:
            given |= set(source.parameters)
    for name in sorted(given - known):
        logger.warning("merge method %s takes no parameter %r (it takes %s); it is ignored", config.merge_method,
                       name, ", ".join(sorted(known)) or "none")
