"""Loading Hugging Face model folders: the staged pipeline of :func:`load_model`.

config.json names an architecture; its module tree is built on the meta
device; transforms (quantizers, adapters) reshape it there; it is
materialised once on its device in the target dtype, with initialisation
skipped (no wasted random fill); then each tensor is filled by name from a
weight source (memory-mapped safetensors by default; never pickle), so
loading peaks near one copy of the weights. Every stage but the first is
open to plugins (see docs/architecture.md, "Loading a model").
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from enigma.dtypes import NAMES as DTYPE_NAMES
from enigma.dtypes import canonical, torch_dtype
from enigma.errors import ConfigError, EnigmaError, NotFoundError, PluginError
from enigma.kinds import LoadContext, Weights
from enigma.models import architecture_class
from enigma.models.base import persistent_tensors
from enigma.weights import open_weights


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
    if str(requested) == "auto":
        declared = canonical(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32") or "float32"
        dtype = torch_dtype(declared)
        return torch.float32 if (dtype == torch.float16 and device.type == "cpu") else dtype
    if canonical(requested) is None:
        raise ConfigError(f"dtype {requested!r} is not supported; choose auto, {', '.join(DTYPE_NAMES)}")
    return torch_dtype(requested)


def load_weights(model: torch.nn.Module, weights: Weights, *, folder: Path | str = "the model folder") -> None:
    """Fill every parameter and persistent buffer of ``model`` from the checkpoint tensor of the same name.

    Fails naming the tensor (and both shapes) when one is missing or mismatched.
    Tensors keep the model's dtypes: float checkpoints are cast to the build
    dtype, integer (packed) tensors are copied as they are.
    """
    prefixes = ("", *getattr(model, "CHECKPOINT_PREFIXES", ()))
    with torch.no_grad():
        for name, tensor in persistent_tensors(model):
            found = next((prefix + name for prefix in prefixes if prefix + name in weights), None)
            if found is None:
                raise NotFoundError(f"checkpoint in {folder} has no tensor {name!r} (expected shape "
                                    f"{list(tensor.shape)}); the folder is incomplete or not of the "
                                    "architecture its config.json names")
            shape = tuple(weights.shape(found))
            if tuple(tensor.shape) != shape:
                raise ConfigError(f"checkpoint tensor {found!r} in {folder} has shape {list(shape)} but the "
                                  f"model built from config.json expects {list(tensor.shape)}; config.json "
                                  "and weights disagree")
            tensor.copy_(weights.get(found))


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

    @property
    def quantization(self) -> str | None:
        """The quantization type of a quantized folder (``quantization_config.type``), else None."""
        from enigma.quantize import quantization_type

        return quantization_type(self.hf_config)


def load_model(folder: str | Path, *, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
               options: Mapping[str, Any] | None = None, host: Any = None) -> LoadedModel:
    """Build the model a Hugging Face folder describes and load its weights, stage by stage.

    1. config.json → the architecture's class (an ``architecture`` implementation);
    2. the module tree, built on the meta device (no memory, no initialisation);
    3. transforms: a quantized folder's quantizer, then every ``enigma_transform_model`` hook;
    4. materialised on ``device`` in the target dtype (one allocation per tensor);
    5. weights from the first ``weight_source`` that reads the folder, by tensor name.
    ``options`` reach the transforms as ``LoadContext.options``.
    """
    if host is None:
        from enigma.plugins import get_host

        host = get_host()
    folder = Path(folder)
    hf_config = read_hf_config(folder)
    architecture, cls = architecture_class(hf_config, source=str(folder / "config.json"), host=host)
    device = torch.device(device)
    build_dtype = resolve_dtype(dtype, hf_config, device)
    context = LoadContext(folder=folder, hf_config=hf_config, architecture=architecture, dtype=build_dtype,
                          device=device, options=dict(options or {}))
    with torch.device("meta"), default_dtype(build_dtype), skip_weight_init():
        model = cls.from_hf_config(hf_config)
        apply_transforms(model, context, host=host)
    model = model.to_empty(device=device)
    model.post_materialize()
    with open_weights(folder, host=host) as weights:
        load_weights(model, weights, folder=folder)
    return LoadedModel(model.eval(), hf_config, architecture, build_dtype, folder)


def apply_transforms(model: torch.nn.Module, context: LoadContext, *, host: Any) -> None:
    """Stage 3: the folder's quantizer (``quantization_config.quant_method``), then plugins' transforms."""
    quantization = context.quantization
    if quantization is not None:
        method = quantization.get("quant_method")
        try:
            quantizer = host.create("quantizer", str(method))
        except NotFoundError:
            raise NotFoundError(f"{context.folder} holds a model quantized with {method!r}, which no installed "
                                f"quantizer reads; install the plugin that provides quantizer {method!r} "
                                "('enigma quantize --list' shows what is installed)") from None
        quantizer.transform(model, context=context)
    for implementation in reversed(host.hook.enigma_transform_model.get_hookimpls()):
        try:
            implementation.function(**{arg: {"model": model, "context": context}[arg]
                                       for arg in implementation.argnames})
        except EnigmaError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {implementation.plugin_name!r} failed to transform {context.folder} "
                              f"({context.architecture}): {type(exc).__name__}: {exc}") from exc
