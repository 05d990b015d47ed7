"""Loading Hugging Face model folders: config.json, safetensors, tokenizer.

Weights are read from safetensors only (single file or sharded with
``model.safetensors.index.json``) — never pickle. The model is built
directly on its device in the target dtype with initialization skipped (one
allocation, no wasted random fill), then filled tensor by tensor from
memory-mapped files, so loading peaks near one copy of the weights.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import attrs
import torch

from enigma.errors import ConfigError, NotFoundError
from enigma.models import architecture_of, model_class

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
IGNORED_CHECKPOINT_SUFFIXES = ("rotary_emb.inv_freq", "position_ids")


def read_hf_config(folder: Path) -> dict[str, Any]:
    """config.json of a model folder, with errors that say what is wrong."""
    path = folder / "config.json"
    if not folder.is_dir():
        raise NotFoundError(f"model folder {folder} does not exist")
    if not path.exists():
        raise NotFoundError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); re-download the model") from exc


def resolve_dtype(requested: str | torch.dtype, hf_config: dict[str, Any], device: torch.device) -> torch.dtype:
    """The dtype to run in. ``auto``: the checkpoint's, except float16 on CPU
    (slow there) which runs as float32."""
    if isinstance(requested, torch.dtype):
        return requested
    name = _ALIASES.get(str(requested), str(requested))
    if name == "auto":
        declared = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
        dtype = DTYPES.get(_ALIASES.get(declared, declared), torch.float32)
        return torch.float32 if (dtype == torch.float16 and device.type == "cpu") else dtype
    if name not in DTYPES:
        raise ConfigError(f"dtype {requested!r} is not supported; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


class SafetensorsWeights:
    """The tensors of a folder's safetensors files, opened memory-mapped."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(path.name for path in folder.glob("*.safetensors"))
            weight_map = None
        if not files:
            pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
            hint = (f" It has {', '.join(pickles)}: pickle files are never loaded (they can run code); "
                    "convert them to safetensors first.") if pickles else ""
            raise NotFoundError(f"model folder {folder} has no *.safetensors weights.{hint}")
        missing = [name for name in files if not (folder / name).exists()]
        if missing:
            raise NotFoundError(f"model folder {folder} lacks shard(s) {', '.join(missing)} named by "
                                "model.safetensors.index.json; re-download the model")
        self.folder = folder
        self.files = files
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        self._location: dict[str, str] = {}
        from safetensors import safe_open

        for name in files:
            handle = self._stack.enter_context(safe_open(str(folder / name), framework="pt"))
            self._handles[name] = handle
            for key in handle.keys():
                self._location[key] = name

    def __enter__(self) -> SafetensorsWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def keys(self) -> Iterator[str]:
        return iter(self._location)

    def __contains__(self, key: str) -> bool:
        return key in self._location

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._location[key]].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self._location[key]].get_tensor(key)


def load_weights(model: torch.nn.Module, weights: SafetensorsWeights) -> None:
    """Copy every parameter of ``model`` from the checkpoint, stacking fused ones.

    Fails naming the tensor (and both shapes) when one is missing or mismatched.
    """
    stacked: dict[str, tuple[str, ...]] = getattr(model, "STACKED_PARAMS", {})
    prefixes = ("", *getattr(model, "CHECKPOINT_PREFIXES", ()))

    def checkpoint_name(name: str) -> str | None:
        for prefix in prefixes:
            if prefix + name in weights:
                return prefix + name
        return None

    with torch.no_grad():
        for name, param in model.named_parameters():
            fused = next((key for key in stacked if f".{key}." in f".{name}"), None)
            parts = [name.replace(fused, part) for part in stacked[fused]] if fused else [name]
            offset = 0
            for part in parts:
                found = checkpoint_name(part)
                if found is None:
                    raise NotFoundError(f"checkpoint in {weights.folder} has no tensor {part!r} "
                                        f"(expected shape {_expected_shape(param, parts, part)}); the "
                                        "folder is incomplete or not of the architecture its config.json names")
                shape = weights.shape(found)
                rows = shape[0] if fused else param.shape[0] if param.dim() else 0
                target = param[offset:offset + rows] if fused else param
                if tuple(target.shape) != shape:
                    raise ConfigError(f"checkpoint tensor {found!r} in {weights.folder} has shape "
                                      f"{list(shape)} but the model built from config.json expects "
                                      f"{list(target.shape)}; config.json and weights disagree")
                target.copy_(weights.get(found))
                offset += rows
            if fused and offset != param.shape[0]:
                raise ConfigError(f"checkpoint tensors {parts} stack to {offset} rows but {name!r} "
                                  f"expects {param.shape[0]}; config.json and weights disagree")


def _expected_shape(param: torch.Tensor, parts: list[str], part: str) -> list[int] | str:
    return list(param.shape) if len(parts) == 1 else f"a slice of {list(param.shape)}"


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_",
                   "xavier_normal_", "kaiming_uniform_", "kaiming_normal_")


@contextlib.contextmanager
def skip_weight_init() -> Iterator[None]:
    """Build modules without initializing their weights (the checkpoint overwrites them).

    Besides the wasted work, initializing meta tensors makes torch import its
    compiler stack on first use (about 2 s on a small CPU), which would sit
    in front of every ``enigma run``'s first token.
    """
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    for name in _INIT_FUNCTIONS:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create floating-point parameters in ``dtype`` (so they are allocated once, not cast)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


@attrs.frozen
class LoadedModel:
    """A model ready to run, and what was read to build it."""

    model: torch.nn.Module
    hf_config: dict[str, Any]
    architecture: str
    dtype: torch.dtype
    folder: Path

    @property
    def is_embedding_model(self) -> bool:
        return not hasattr(self.model, "compute_logits")


def load_model(folder: str | Path, *, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "cpu") -> LoadedModel:
    """Build the model a Hugging Face folder describes and load its weights."""
    folder = Path(folder)
    hf_config = read_hf_config(folder)
    architecture = architecture_of(hf_config, source=str(folder / "config.json"))
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, hf_config, device)
    cls = model_class(architecture)
    with torch.device(device), default_dtype(torch_dtype), skip_weight_init():
        model = cls.from_hf_config(hf_config)  # the one allocation, in the target dtype, left uninitialized
    model.post_materialize()
    with SafetensorsWeights(folder) as weights:
        load_weights(model, weights)
    return LoadedModel(model.eval(), hf_config, architecture, torch_dtype, folder)
