"""Model merging: mergekit's methods and YAML, streamed tensor by tensor.

:func:`merge` runs a :class:`MergeConfig` (``MergeConfig.from_yaml`` reads
mergekit's YAML as is); :func:`merge_models` is the one-call form
(``merge_models([a, b], weights=[0.7, 0.3], method="slerp")``). Inputs are
store names, packaged models or Hugging Face folders with safetensors
weights. Each output tensor is read from every input (memory-mapped),
merged, and appended to the output's safetensors shards before the next is
read, so memory holds a few tensors, not the models. The result is a Hugging
Face folder — config.json and tokenizer from the base model (or
``tokenizer_source``), the config as ``mergekit_config.yml`` — written to a
new folder or into the store, atomically.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from enigma.errors import BadRequestError
from enigma.merging.config import MergeConfig, OutputSlice, SliceSource
from enigma.merging.methods import METHODS, MergeMethod
from enigma.merging.plan import MergePlan, OpenModel, TensorTask, plan_merge

__all__ = ["METHODS", "MergeConfig", "MergeMethod", "MergePlan", "merge", "merge_models", "tensor_seed"]

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def tensor_seed(seed: int, tensor_name: str) -> int:
    """The seed of the generator a randomized method (DARE) draws from for one output tensor: fixed by the
    merge's seed and the tensor's name, so a tensor's mask does not depend on the order of the work."""
    digest = hashlib.sha256(f"{seed}:{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def merge(config: MergeConfig | str | Path, *, output: str | Path | None = None, name: str | None = None,
          seed: int = 0, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
          progress: Callable[[int, int], None] | None = None) -> Path:
    """Run a merge into the new folder ``output`` or into the store as ``name``; returns the folder.

    ``config`` is a :class:`MergeConfig` or the path of a mergekit YAML file.
    ``seed`` fixes DARE's and DELLA's random drops. Errors in the config,
    missing models and incompatible tensors are reported before anything is
    written.
    """
    from enigma.artifacts import write_model
    from enigma.llm import resolve_model_path
    from enigma.loader import read_hf_config
    from enigma.saving import copy_side_files
    from enigma.store import ModelName
    from enigma.weights import SafetensorsWeights

    if not isinstance(config, MergeConfig):
        config = MergeConfig.from_yaml(config)
    if (output is None) == (name is None):
        raise BadRequestError("give exactly one of output (a new folder) and name (a store name)")
    store_name = ModelName.parse(name) if name is not None else None
    method = METHODS.get(config.merge_method)
    if method is None:
        raise BadRequestError(f"unknown merge method {config.merge_method!r}; enigma merges with "
                              f"{', '.join(METHODS)}")
    with ExitStack() as stack:
        models: dict[str, OpenModel] = {}
        for reference in config.models():
            folder = resolve_model_path(reference)
            if not any(folder.glob("*.safetensors")):
                raise BadRequestError(f"model {reference} ({folder}) has no safetensors weights; merging reads "
                                      "Hugging Face folders with *.safetensors")
            weights = stack.enter_context(SafetensorsWeights(folder))
            models[reference] = OpenModel(reference, folder, read_hf_config(folder), weights)
        plan = plan_merge(config, method, models)
        tokenizer_folder = _tokenizer_folder(config, models, plan)

        def make(staged: Path) -> None:
            _write_tensors(plan, method, staged, seed=seed, max_shard_bytes=max_shard_bytes, progress=progress)
            _write_config(plan, config, staged)
            copy_side_files(tokenizer_folder, staged)
            if config.raw is not None:
                import yaml

                (staged / "mergekit_config.yml").write_text(yaml.safe_dump(dict(config.raw), sort_keys=False),
                                                            encoding="utf-8")

        return write_model(make, output=output, name=store_name,
                           source=f"merge:{config.merge_method}:{'+'.join(config.models())}")


def merge_models(models: Sequence[str | Path], *, weights: Sequence[float] | None = None, method: str = "linear",
                 base: str | Path | None = None, output: str | Path | None = None, name: str | None = None,
                 seed: int = 0, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 progress: Callable[[int, int], None] | None = None, **parameters: Any) -> Path:
    """Merge ``models`` in one call: ``merge_models([a, b, c], weights=[0.5, 0.3, 0.2], method="ties",
    base=a, density=0.5, output="merged")``.

    ``weights`` are per model (the base's is ignored by methods that take none
    for it); other keyword arguments are the method's global parameters. With
    ``method="slerp"``, two models interpolate from the first (or ``base``) by
    ``t`` (default: the second model's share of ``weights``, else 0.5) and
    more than two are merged by ``multislerp`` with ``weights``.
    """
    references = [str(m) for m in models]
    if not references:
        raise BadRequestError("merge_models needs at least one model")
    if weights is not None and len(weights) != len(references):
        raise BadRequestError(f"{len(weights)} weights for {len(references)} models; give one weight per model")
    base_name = str(base) if base is not None else None
    if method == "slerp":
        if len(references) > 2:
            method = "multislerp"
        else:
            base_name = base_name or references[0]
            if "t" not in parameters:
                other = 1 - references.index(base_name) if base_name in references else 1
                parameters["t"] = float(weights[other] / sum(weights)) if weights else 0.5
            weights = None
    sources = tuple(SliceSource(ref, parameters={} if weights is None else {"weight": float(w)})
                    for ref, w in zip(references, weights or [None] * len(references)))
    raw = {"merge_method": method, **({"base_model": base_name} if base_name else {}),
           "models": [{"model": s.model, **({"parameters": dict(s.parameters)} if s.parameters else {})}
                      for s in sources],
           **({"parameters": parameters} if parameters else {})}
    config = MergeConfig(merge_method=method, slices=(OutputSlice(sources),), base_model=base_name,
                         parameters=parameters, whole_models=True, raw=raw)
    return merge(config, output=output, name=name, seed=seed, max_shard_bytes=max_shard_bytes, progress=progress)


def _write_tensors(plan: MergePlan, method: MergeMethod, folder: Path, *, seed: int, max_shard_bytes: int,
                   progress: Callable[[int, int], None] | None) -> None:
    from enigma.saving import StreamingSafetensorsWriter, TensorLayout

    layout = [TensorLayout(task.output, task.out_dtype, task.shape) for task in plan.tasks]
    with StreamingSafetensorsWriter(folder, layout, max_shard_bytes=max_shard_bytes,
                                    metadata={"merged_by": "enigma"}) as writer:
        for done, task in enumerate(plan.tasks, start=1):
            writer.write(task.output, merge_tensor(plan, method, task, seed=seed))
            if progress is not None:
                progress(done, len(plan.tasks))


def merge_tensor(plan: MergePlan, method: MergeMethod, task: TensorTask, *, seed: int = 0) -> torch.Tensor:
    """One output tensor of a plan, computed from its inputs."""
    tensors = [plan.models[index].weights.get(name).to(task.compute_dtype) for index, name in task.inputs]
    if not task.compute_dtype.is_floating_point:
        if any(not torch.equal(tensors[0], other) for other in tensors[1:]):
            raise BadRequestError(f"tensor {task.output} holds integers that differ between the models; "
                                  "they cannot be merged")
        return tensors[0]
    generator = torch.Generator().manual_seed(tensor_seed(seed, task.output)) if method.randomized else None
    with torch.no_grad():
        result = method.function(tensors, task.base_index, task.shared, task.per_input, generator)
    return result.to(task.out_dtype)


def _write_config(plan: MergePlan, config: MergeConfig, folder: Path) -> None:
    from enigma.dtypes import dtype_name
    from enigma.fsutil import atomic_write_text

    hf_config = dict(plan.reference.hf_config)
    if plan.reference.stack is not None and "num_hidden_layers" in hf_config:
        hf_config["num_hidden_layers"] = plan.num_layers
    floating = [task.out_dtype for task in plan.tasks if task.out_dtype.is_floating_point]
    if floating:
        hf_config["torch_dtype"] = dtype_name(floating[0])
    hf_config.pop("dtype", None)
    atomic_write_text(folder / "config.json", json.dumps(hf_config, indent=2, sort_keys=True) + "\n")


def _tokenizer_folder(config: MergeConfig, models: Mapping[str, OpenModel], plan: MergePlan) -> Path:
    source = config.tokenizer_source
    if source is None or source == "base":
        return plan.reference.folder
    if source in models:
        return models[source].folder
    from enigma.llm import resolve_model_path

    return resolve_model_path(source)
