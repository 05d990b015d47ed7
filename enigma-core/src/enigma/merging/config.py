"""mergekit's YAML, read as mergekit reads it: models or slices, parameters with filters and gradients.

A config names a ``merge_method``, the models (``models:`` — whole models —
or ``slices:`` — layer ranges, stacked), an optional ``base_model``, and
``parameters`` at three levels: per model (or per slice source), per slice,
and global; the most specific level that gives a value wins. A value is a
scalar, a gradient (a list, interpolated over the layers of a slice: layer
``i`` of ``n`` is at ``t = i / (n - 1)``), or a list of ``{filter, value}``
conditions matched as substrings of the tensor's name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from enigma.errors import BadRequestError, ConfigError

TOP_LEVEL_KEYS = {"merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
                  "tokenizer_source", "modules", "tokenizer", "chat_template", "name"}
UNSUPPORTED = {
    "modules": "per-module merges (multimodal models) are not supported; use models: or slices:",
    "tokenizer": "tokenizer: blocks (vocabulary surgery) are not supported; use tokenizer_source: base or a model",
    "chat_template": "chat_template: is not supported; edit the merged folder's tokenizer_config.json",
}


@attrs.frozen
class SliceSource:
    """One model's contribution to an output slice: its layers ``[start, end)`` (all of them when None)."""

    model: str
    layer_range: tuple[int, int] | None = None
    parameters: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class OutputSlice:
    """A run of output layers, each merged from the same-numbered layer of every source's range."""

    sources: tuple[SliceSource, ...]
    base_model: str | None = None
    parameters: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class MergeConfig:
    """A merge, as a mergekit YAML file describes it."""

    merge_method: str
    slices: tuple[OutputSlice, ...]
    base_model: str | None = None
    parameters: Mapping[str, Any] = attrs.field(factory=dict)
    dtype: str | None = None
    """The dtype the inputs are cast to before merging (default: theirs)."""
    out_dtype: str | None = None
    """The dtype written (default: the merge's)."""
    tokenizer_source: str | None = None
    """``"base"`` or a model whose tokenizer the result gets (default: the base model's, else the first's)."""
    whole_models: bool = False
    """Whether it came from a ``models:`` list (each source spans all its layers; the base joins if absent)."""
    raw: Mapping[str, Any] | None = attrs.field(default=None, eq=False, repr=False)
    """The YAML as read, saved beside the result as ``mergekit_config.yml``."""

    @classmethod
    def from_yaml(cls, path: str | Path) -> MergeConfig:
        """Read a mergekit YAML file; errors name the file and the key."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"merge config {path} does not exist") from None
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"merge config {path} is not readable YAML: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "merge config") -> MergeConfig:
        """Build from mergekit's YAML structure (a dict)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source} must be a mapping with merge_method and models: or slices:")
        unknown = set(data) - TOP_LEVEL_KEYS
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; a mergekit config has "
                              f"{', '.join(sorted(TOP_LEVEL_KEYS - set(UNSUPPORTED)))}")
        for key, why in UNSUPPORTED.items():
            if data.get(key) is not None:
                raise ConfigError(f"{source}: {why}")
        if not data.get("merge_method"):
            raise ConfigError(f"{source} names no merge_method (linear, slerp, ties, dare_ties...)")
        if bool(data.get("models")) == bool(data.get("slices")):
            raise ConfigError(f"{source} must have exactly one of models: and slices:")
        tokenizer_source = data.get("tokenizer_source")
        if tokenizer_source == "union":
            raise ConfigError(f"{source}: tokenizer_source: union (merging vocabularies) is not supported; "
                              "use base or a model")
        base = _model_name(data.get("base_model"), f"{source}: base_model")
        if data.get("models"):
            sources = tuple(_source(entry, f"{source}: models[{i}]", whole=True)
                            for i, entry in enumerate(_list(data["models"], f"{source}: models")))
            slices = (OutputSlice(sources),)
        else:
            slices = tuple(_slice(entry, f"{source}: slices[{i}]")
                           for i, entry in enumerate(_list(data["slices"], f"{source}: slices")))
        return cls(merge_method=str(data["merge_method"]), slices=slices, base_model=base,
                   parameters=_parameters(data.get("parameters"), f"{source}: parameters"),
                   dtype=data.get("dtype"), out_dtype=data.get("out_dtype"),
                   tokenizer_source=None if tokenizer_source is None else str(tokenizer_source),
                   whole_models=bool(data.get("models")), raw=data)

    def models(self) -> list[str]:
        """Every model the merge reads, base first, each once."""
        names = [self.base_model] if self.base_model else []
        for output in self.slices:
            names += [output.base_model] if output.base_model else []
            names += [s.model for s in output.sources]
        return list(dict.fromkeys(names))


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list")
    return value


def _model_name(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, Mapping) and "model" in value:  # mergekit's {model: ..., lora: ...} form
        if value.get("lora"):
            raise ConfigError(f"{where}: LoRA-applied inputs (model+lora) are not supported; merge the adapter "
                              "into its model first")
        value = value["model"]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must name a model (a folder or store name), not {value!r}")
    if "+" in value:
        raise ConfigError(f"{where}: {value!r} applies a LoRA (model+lora), which is not supported; merge the "
                          "adapter into its model first")
    return value


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping of parameter names to values")
    return dict(value)


def _source(entry: Any, where: str, *, whole: bool) -> SliceSource:
    if not isinstance(entry, Mapping) or "model" not in entry:
        raise ConfigError(f"{where} must be a mapping with a model:")
    layer_range = None
    if not whole:
        found = entry.get("layer_range")
        if (not isinstance(found, Sequence) or len(found) != 2 or not all(isinstance(x, int) for x in found)
                or found[0] < 0 or found[1] <= found[0]):
            raise ConfigError(f"{where}: layer_range must be [start, end) with 0 <= start < end, not {found!r}")
        layer_range = (found[0], found[1])
    return SliceSource(model=_model_name(entry["model"], f"{where}.model"), layer_range=layer_range,
                       parameters=_parameters(entry.get("parameters"), f"{where}.parameters"))


def _slice(entry: Any, where: str) -> OutputSlice:
    if not isinstance(entry, Mapping) or not entry.get("sources"):
        raise ConfigError(f"{where} must be a mapping with sources:")
    sources = tuple(_source(s, f"{where}.sources[{i}]", whole=False)
                    for i, s in enumerate(_list(entry["sources"], f"{where}.sources")))
    return OutputSlice(sources, base_model=_model_name(entry.get("base_model"), f"{where}.base_model"),
                       parameters=_parameters(entry.get("parameters"), f"{where}.parameters"))


def evaluate_setting(setting: Any, tensor_name: str, t: float, kind: type) -> Any:
    """A parameter's value for one tensor at layer position ``t``; None when no filter matches.

    Numeric gradients interpolate between neighbouring entries; booleans and
    strings pick the entry at ``int(t * (n - 1))``.
    """
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return _coerce(setting, kind)
    if not isinstance(setting, list):
        raise BadRequestError(f"parameter value {setting!r} is neither a scalar, a gradient list nor "
                              "a list of {filter, value}")
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        values = [_coerce(e, kind) for e in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        low = int(scaled)
        high = min(len(values) - 1, low + 1)
        fraction = scaled - low
        return _coerce((1 - fraction) * values[low] + fraction * values[high], kind)
    for condition in setting:
        if not isinstance(condition, Mapping) or "value" not in condition:
            raise BadRequestError(f"parameter condition {condition!r} must be a mapping with value: (and filter:)")
        pattern = condition.get("filter")
        if pattern is None or pattern == "*" or (tensor_name and str(pattern) in tensor_name):
            return evaluate_setting(condition["value"], tensor_name, t, kind)
    return None


def _coerce(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "yes", "1"):
                return True
            if value.lower() in ("false", "no", "0"):
                return False
            raise BadRequestError(f"{value!r} is not a boolean")
        return bool(value)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise BadRequestError(f"{value!r} is not a {kind.__name__}") from None


def resolve(name: str, kind: type, default: Any, scopes: Sequence[Mapping[str, Any]], *, tensor_name: str,
            t: float, where: str) -> Any:
    """The first value any scope (most specific first) gives ``name`` for this tensor, else ``default``."""
    from enigma.merging.methods import REQUIRED

    for scope in scopes:
        if name in scope:
            try:
                value = evaluate_setting(scope[name], tensor_name, t, kind)
            except BadRequestError as exc:
                raise BadRequestError(f"parameter {name!r} of {where}: {exc}") from None
            if value is not None:
                return value
    if default is REQUIRED:
        raise BadRequestError(f"merge parameter {name!r} is required for {where} (tensor {tensor_name}); give it "
                              "under the model's parameters: or the global parameters:")
    return default
