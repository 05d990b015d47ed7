"""Quantizing models: the quantizer kind's caller (``enigma quantize``, :func:`quantize`).

A quantizer (:class:`enigma.kinds.Quantizer`) names the types it makes
(``Q4_K_M``, ``INT8``...). :func:`find_quantizer` finds the one that makes a
type; :func:`quantize` hands it a :class:`QuantizationSource` — the model's
tensors streamed one at a time from its weight source (a 7B model is never
held in float32), its module tree on the meta device, and the whole model
loaded only for quantizers that calibrate with forward passes — has it write
the artifact into a scratch folder beside the destination,
copies the tokenizer files, checks that the artifact names its quantizer,
and only then moves it into place — into the store with a manifest
(quantization, files, sizes, sha256), or to a folder. A failure leaves
nothing behind. Loading an artifact needs nothing more: its config.json's
``quantization_config`` sends the loader to the same quantizer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from enigma.errors import BadRequestError, ConfigError, NotFoundError

logger = logging.getLogger("enigma.quantize")

FLOAT_TYPES = ("F32", "F16", "BF16")
"""Type names of float weights in a quantizer's container (a GGUF at F16): made again without loss."""
MODEL_FILE_SUFFIXES = (".gguf",)
"""Single-file model formats: ``--output x.gguf`` writes just that file."""
SUGGESTED_PLUGINS = ("enigma-plugin-ggml (llama.cpp k-quants: Q4_K_M, Q5_K_M, Q6_K, Q8_0)",
                     "enigma-plugin-exl2 (EXL2 mixed-bit GPTQ)")


def quantization_type(hf_config: Mapping[str, Any]) -> str | None:
    """The type a config.json says its folder is quantized as (``quantization_config.type``, else its
    ``quant_method``), or None for float weights."""
    config = hf_config.get("quantization_config")
    if not isinstance(config, Mapping):
        return None
    found = config.get("type") or config.get("quant_method")
    return str(found) if found else None


@attrs.frozen
class QuantizationSource:
    """The model a quantizer quantizes, read as lazily as the quantizer needs."""

    folder: Path
    hf_config: dict[str, Any]
    host: Any = attrs.field(repr=False)

    @property
    def quantization(self) -> str | None:
        """The type the source is quantized as already, or None for float weights."""
        return quantization_type(self.hf_config)

    def weights(self) -> Any:
        """The folder's tensors by checkpoint name, in their stored dtypes (a context manager,
        :class:`enigma.kinds.Weights`): read one at a time, memory-mapped where the format allows."""
        from enigma.weights import open_weights

        return open_weights(self.folder, host=self.host)

    def module_tree(self) -> Any:
        """The model's modules on the meta device (no memory): which tensors belong to which Linear."""
        import torch

        from enigma.loader import skip_weight_init
        from enigma.models import architecture_class

        _, cls = architecture_class(self.hf_config, source=str(self.folder / "config.json"), host=self.host)
        with torch.device("meta"), skip_weight_init():
            return cls.from_hf_config(self.hf_config)

    def load(self, *, dtype: str = "float32") -> Any:
        """The whole model (an :class:`enigma.loader.LoadedModel` on the CPU), for quantizers that run it
        (calibration); it holds every weight in ``dtype``."""
        from enigma.loader import load_model

        return load_model(self.folder, dtype=dtype, device="cpu", host=self.host)


@attrs.frozen
class QuantType:
    """One quantization type an installed quantizer makes."""

    name: str
    description: str
    quantizer: str
    """The registered name of the quantizer making it (``quant_method`` in artifacts)."""
    origin: str
    """The distribution that provides it."""


def installed_types(host: Any = None) -> list[QuantType]:
    """Every type of every available quantizer, in the registry's order."""
    host = host or _host()
    found = []
    for implementation in host.registry.implementations("quantizer"):
        if not implementation.availability():
            continue
        for name, description in implementation.create().types().items():
            found.append(QuantType(name, description, implementation.name, implementation.origin))
    return found


def find_quantizer(type_name: str, host: Any = None) -> tuple[Any, QuantType]:
    """``(quantizer instance, type)`` for a type name (case-insensitive); errors say what is installed."""
    host = host or _host()
    types = installed_types(host)
    if not types:
        raise NotFoundError(f"no quantizer is installed, so type {type_name!r} cannot be made; install one: "
                            + "; ".join(SUGGESTED_PLUGINS))
    matches = [t for t in types if t.name.lower() == type_name.lower()]
    if not matches:
        known = ", ".join(f"{t.name} ({t.quantizer})" for t in types)
        raise NotFoundError(f"no installed quantizer makes type {type_name!r}; installed types: {known} "
                            "('enigma quantize --list' describes them)")
    if len(matches) > 1:
        makers = ", ".join(t.quantizer for t in matches)
        raise BadRequestError(f"type {type_name!r} is made by several quantizers ({makers}); "
                              f"name one as QUANTIZER:TYPE, e.g. {matches[0].quantizer}:{matches[0].name}")
    chosen = matches[0]
    return host.create("quantizer", chosen.quantizer), chosen


def _split_type(type_name: str, host: Any) -> tuple[Any, QuantType]:
    quantizer_name, sep, bare = type_name.partition(":")
    if not sep:
        return find_quantizer(type_name, host)
    quantizer = host.create("quantizer", quantizer_name)
    for name, description in quantizer.types().items():
        if name.lower() == bare.lower():
            impl = host.select("quantizer", quantizer_name)
            return quantizer, QuantType(name, description, quantizer_name, impl.origin)
    raise NotFoundError(f"quantizer {quantizer_name!r} makes no type {bare!r}; it makes "
                        f"{', '.join(quantizer.types())}")


def quantize(source: str | Path, type_name: str, *, name: str | None = None, output: str | Path | None = None,
             options: Mapping[str, Any] | None = None, progress: Callable[[int, int], None] | None = None,
             host: Any = None) -> Path:
    """Quantize ``source`` (a store name, packaged model, HF folder or model file) as ``type_name``.

    The result goes to the folder ``output`` (which must not exist yet) — or, when
    ``output`` names a single-file format (``x.gguf``), to that one file —, or
    into the store as ``name`` (default ``<source name>:<type, lower-case>``).
    Returns the folder (or file) written.
    """
    from enigma.llm import resolve_model_path
    from enigma.loader import read_hf_config
    from enigma.store import ModelName

    host = host or _host()
    quantizer, chosen = _split_type(type_name, host)
    folder = resolve_model_path(source)
    model = QuantizationSource(folder=folder, hf_config=read_hf_config(folder), host=host)
    if model.quantization is not None and model.quantization.upper() not in FLOAT_TYPES:
        logger.warning("%s is already quantized (%s); quantizing it again compounds the error — start from "
                       "the original weights where you can", source, model.quantization)

    def write(staged: Path) -> None:
        quantizer.quantize(model, type=chosen.name, output=staged, options=dict(options or {}), progress=progress)
        _check_artifact(staged, chosen)
        from enigma.saving import SIDE_FILES, copy_side_files

        copy_side_files(folder, staged, tuple(n for n in SIDE_FILES if not (staged / n).exists()))

    from enigma.artifacts import write_model

    if output is not None and Path(output).suffix.lower() in MODEL_FILE_SUFFIXES:
        return _write_model_file(write, Path(output), chosen)
    base = None
    if output is None:
        base = ModelName.parse(name) if name else ModelName(_base_name(source, folder), chosen.name.lower())
    return write_model(write, output=output, name=base, source=f"quantize:{source}@{chosen.quantizer}",
                       quantization=chosen.name)


def _write_model_file(write: Callable[[Path], None], output: Path, chosen: QuantType) -> Path:
    """Make the artifact in a scratch folder beside ``output`` and move its one model file there."""
    import os
    import tempfile

    if output.exists():
        raise BadRequestError(f"output {output} exists; choose a new file name or remove it first")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as scratch:
        write(Path(scratch))
        config = json.loads((Path(scratch) / "config.json").read_text(encoding="utf-8"))
        file = (config.get("quantization_config") or {}).get("file")
        if not file or Path(file).suffix.lower() != output.suffix.lower():
            raise BadRequestError(f"type {chosen.name} ({chosen.quantizer}) makes a model folder, not one "
                                  f"{output.suffix} file; give --output a folder")
        os.replace(Path(scratch) / file, output)
    return output


def _check_artifact(folder: Path, chosen: QuantType) -> None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"quantizer {chosen.quantizer!r} ({chosen.origin}) wrote no readable config.json "
                          f"({exc}); the quantizer is broken — report it to its authors") from exc
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method != chosen.quantizer:
        raise ConfigError(f"quantizer {chosen.quantizer!r} ({chosen.origin}) wrote config.json with "
                          f"quantization_config.quant_method = {method!r}; it must be {chosen.quantizer!r} so "
                          "the loader can read the artifact back")


def _base_name(source: str | Path, folder: Path) -> str:
    from enigma.store import ModelName

    try:
        return ModelName.parse(str(source)).name
    except BadRequestError:
        return ModelName.parse(folder.resolve().name.lower()).name


def _host() -> Any:
    from enigma.plugins import get_host

    return get_host()
