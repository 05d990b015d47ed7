"""LoRA adapters on enigma models: apply, save and load in PEFT's format, merge into a model folder.

An adapter folder is PEFT's: ``adapter_config.json`` and
``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight``
``[rank, in]`` and ``...lora_B.weight`` ``[out, rank]``. enigma's module names
are the Hugging Face checkpoint's, so the keys are PEFT's as they are.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from enigma.errors import BadRequestError, ConfigError
from enigma_lora.config import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, LoRAConfig
from enigma_lora.layers import LoRALinear

OUTPUT_HEADS = ("lm_head",)


def apply_lora(model: nn.Module, config: LoRAConfig, *, freeze_base: bool = True) -> list[str]:
    """Wrap every Linear of ``model`` that ``config`` targets in a :class:`LoRALinear`; with
    ``freeze_base`` only the adapters train. Returns the wrapped modules' names."""
    from enigma_lora.nf4 import NF4Linear

    linears = {name: module for name, module in model.named_modules()
               if (isinstance(module, nn.Linear) and not isinstance(module, LoRALinear))
               or isinstance(module, NF4Linear)}
    chosen = [name for name in linears if config.matches(name, is_output_head=name.split(".")[-1] in OUTPUT_HEADS)]
    if not chosen:
        suffixes = sorted({name.split(".")[-1] for name in linears})
        raise BadRequestError(f"no module of the model matches target_modules {_targets(config)}; its Linear "
                              f"modules are {', '.join(suffixes)} (or use all-linear)")
    if freeze_base:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    for name in chosen:
        parent, _, attribute = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        wrapped = LoRALinear(linears[name], rank=config.rank_for(name), scaling=config.scaling_for(name),
                             dropout=config.dropout)
        setattr(owner, attribute, wrapped)
    return chosen


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's adapted Linears by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys."""
    tensors = {}
    for name, module in lora_modules(model).items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.weight.detach()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.weight.detach()
    return tensors


def save_adapter(model: nn.Module, folder: str | Path, config: LoRAConfig, *, dtype: torch.dtype | None = None,
                 tokenizer_folder: str | Path | None = None) -> Path:
    """Write the model's adapter as a PEFT adapter folder (``peft.PeftModel.from_pretrained`` loads it), with
    the tokenizer files of ``tokenizer_folder`` beside it when given (as PEFT's trainers save them)."""
    from enigma.fsutil import atomic_write_text
    from enigma.saving import save_safetensors

    folder = Path(folder)
    tensors = adapter_tensors(model)
    if not tensors:
        raise BadRequestError("the model has no LoRA adapter to save; apply_lora first")
    if dtype is not None:
        tensors = {key: t.to(dtype) for key, t in tensors.items()}
    save_safetensors({key: t.contiguous() for key, t in tensors.items()}, folder / ADAPTER_WEIGHTS)
    atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(config.to_peft(), indent=2) + "\n")
    if tokenizer_folder is not None:
        from enigma.saving import TOKENIZER_FILES, copy_side_files

        copy_side_files(tokenizer_folder, folder, TOKENIZER_FILES)
    return folder


def read_adapter(folder: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """An adapter folder's config and tensors by module name (``{module: (A, B)}`` flattened as
    ``"<module>.lora_A"``/``"<module>.lora_B"``)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = LoRAConfig.read(folder)
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        pickled = folder / "adapter_model.bin"
        hint = " (it has adapter_model.bin: pickle files are never loaded; convert it to safetensors)" \
            if pickled.exists() else ""
        raise ConfigError(f"adapter {folder} has no {ADAPTER_WEIGHTS}{hint}")
    tensors = {}
    for key, tensor in load_file(str(path)).items():
        name = key.removeprefix(PEFT_PREFIX).replace(".default.", ".")
        if not name.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ConfigError(f"adapter {folder}: tensor {key!r} is not a LoRA A or B matrix")
        tensors[name.removesuffix(".weight")] = tensor
    return config, tensors


def load_adapter(model: nn.Module, folder: str | Path, *, trainable: bool = False) -> LoRAConfig:
    """Apply the PEFT adapter in ``folder`` to ``model`` (in place) with its trained weights."""
    config, tensors = read_adapter(folder)
    modules = {key.rsplit(".", 1)[0] for key in tensors}
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(modules - linears)
    if unknown:
        raise BadRequestError(f"adapter {folder} adapts {unknown[0]}, which this model does not have (nor "
                              f"{len(unknown) - 1} more); it was trained for another base model")
    for name in sorted(modules):
        rank = tensors[f"{name}.lora_A"].shape[0]
        if rank != config.rank_for(name):
            raise ConfigError(f"adapter {folder}: {name}'s lora_A has rank {rank} but its {ADAPTER_CONFIG} says "
                              f"{config.rank_for(name)} (r / rank_pattern); the adapter is inconsistent")
    apply_lora(model, attrs.evolve(config, target_modules=tuple(sorted(modules))), freeze_base=not trainable)
    adapted = lora_modules(model)
    with torch.no_grad():
        for key, tensor in tensors.items():
            name, _, part = key.rpartition(".")
            target = getattr(adapted[name], part).weight
            if tuple(tensor.shape) != tuple(target.shape):
                raise BadRequestError(f"adapter {folder}: {PEFT_PREFIX}{key}.weight is {list(tensor.shape)} but "
                                      f"the model's {name} needs {list(target.shape)}; the adapter was trained "
                                      "for another base model")
            target.copy_(tensor)
            target.requires_grad_(trainable)
    return config


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight (``W += s · B A``) and unwrap it; returns how many."""
    count = 0
    with torch.no_grad():
        for name, module in lora_modules(model).items():
            base = module.base_weight()
            merged = nn.Parameter((base.float() + module.delta_weight().float()).to(base.dtype),
                                  requires_grad=False)
            bias = module.bias if module.base_layer is None else module.base_layer.bias
            linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
            linear.weight, linear.bias = merged, bias
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attribute, linear)
            count += 1
    return count


def merge_adapter(base: str | Path, adapter: str | Path, *, output: str | Path | None = None,
                  name: str | None = None, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``base`` with ``adapter`` merged into its weights as a plain Hugging Face folder, into the
    new folder ``output`` or the store as ``name``; streamed tensor by tensor (the base is never whole
    in memory). Returns the folder."""
    from enigma.artifacts import write_model
    from enigma.llm import resolve_model_path
    from enigma.loader import read_hf_config
    from enigma.saving import StreamingSafetensorsWriter, TensorLayout, copy_side_files
    from enigma.store import ModelName
    from enigma.weights import SafetensorsWeights

    if (output is None) == (name is None):
        raise BadRequestError("give exactly one of output (a new folder) and name (a store name)")
    folder = resolve_model_path(base)
    hf_config = read_hf_config(folder)
    if hf_config.get("quantization_config"):
        raise BadRequestError(f"{base} is quantized; merge the adapter into the original weights")
    config, tensors = read_adapter(adapter)
    modules = sorted({key.rsplit(".", 1)[0] for key in tensors})

    def make(staged: Path) -> None:

        from enigma.fsutil import atomic_write_text

        with SafetensorsWeights(folder) as weights:
            for module in modules:
                key = f"{module}.weight"
                if key not in weights:
                    raise BadRequestError(f"adapter {adapter} adapts {module}, but {base} has no tensor {key}; "
                                          "the adapter was trained for another base model")
                a, b = tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"]
                wanted = (b.shape[0], a.shape[1])
                if tuple(weights.shape(key)) != wanted:
                    raise BadRequestError(f"adapter {adapter}: {module} is {list(wanted)} by its A and B, but "
                                          f"{base}'s {key} is {list(weights.shape(key))}; the adapter was "
                                          "trained for another base model")
            names = list(weights.keys())
            layout = [TensorLayout(n, weights.dtype(n), tuple(weights.shape(n))) for n in names]
            with StreamingSafetensorsWriter(staged, layout) as writer:
                for done, tensor_name in enumerate(names, start=1):
                    tensor = weights.get(tensor_name)
                    module = tensor_name.removesuffix(".weight")
                    if tensor_name.endswith(".weight") and module in modules:
                        a, b = tensors[f"{module}.lora_A"].float(), tensors[f"{module}.lora_B"].float()
                        tensor = (tensor.float() + (b @ a) * config.scaling_for(module)).to(tensor.dtype)
                    writer.write(tensor_name, tensor)
                    if progress is not None:
                        progress(done, len(names))
        atomic_write_text(staged / "config.json", json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        copy_side_files(folder, staged)

    store_name = ModelName.parse(name) if name is not None else None
    return write_model(make, output=output, name=store_name, source=f"merge-adapter:{base}+{adapter}")


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, a tied parameter once."""
    parameters = list(dict.fromkeys(model.parameters()))
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


def _targets(config: LoRAConfig) -> Any:
    return config.target_modules if isinstance(config.target_modules, str) else ",".join(config.target_modules)
