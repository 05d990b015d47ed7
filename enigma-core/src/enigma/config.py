"""enigma's settings: attrs classes, read from a file, overridden by the environment.

Precedence, lowest first: the defaults below < the config file (TOML, JSON or
YAML; see :mod:`enigma.paths`) < environment variables named
``ENIGMA_<SECTION>__<KEY>`` (``ENIGMA_ENGINE__DTYPE=bfloat16``). Every value is
checked; a bad one raises :class:`~enigma.errors.ConfigError` naming the key,
the value, where it came from (file and line, or variable) and what is allowed.

Plugins have settings too: a plugin declares an attrs class through the
``enigma_plugin_settings`` hook, and its keys live in the file's
``[plugins.<name>]`` table and in ``ENIGMA_PLUGINS__<NAME>__<KEY>`` variables
(name upper-cased, ``-`` as ``_``), checked like the kernel's own. A
section for a plugin that is not installed is ignored with a warning (so
uninstalling a plugin never breaks the file); an unknown key of an installed
plugin is an error naming the plugin and its keys.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import cattrs

from enigma.dtypes import NAMES as DTYPE_NAMES
from enigma.errors import ConfigError, NotFoundError
from enigma.fsutil import atomic_write_text
from enigma.paths import Paths, get_paths

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "ENIGMA_"
ENV_SEPARATOR = "__"
DTYPES = ("auto", *DTYPE_NAMES)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
logger = logging.getLogger("enigma.config")


def setting(default: Any, *, allowed: str, check: Callable[[Any], bool], doc: str) -> Any:
    """An attrs field that knows what values it allows and what it is for."""
    return attrs.field(default=default, metadata={"allowed": allowed, "check": check, "doc": doc})


def _is_name(value: str) -> bool:
    return bool(_NAME.match(value))


@attrs.define
class EngineConfig:
    """How models run."""

    backend: str = setting("auto", allowed="'auto' or the name of an installed backend",
                           check=_is_name, doc="backend implementation ('enigma plugins' lists them)")
    dtype: str = setting("auto", allowed="one of " + ", ".join(DTYPES),
                         check=lambda v: v in DTYPES, doc="weight and activation dtype")
    scheduler: str = setting("auto", allowed="'auto' or the name of an installed scheduler", check=_is_name,
                             doc="scheduler implementation: which requests run in each step")
    cache: str = setting("auto", allowed="'auto' or the name of an installed KV cache", check=_is_name,
                         doc="KV cache implementation: how key/value blocks are laid out and shared")
    device: str = setting("auto", allowed="'auto' or a torch device such as cpu, cuda, cuda:1",
                          check=lambda v: bool(re.match(r"^(auto|cpu|cuda(:\d+)?|mps)$", v)),
                          doc="device the backend runs on")
    native_kernels: bool = setting(True, allowed="true or false", check=lambda v: isinstance(v, bool),
                                   doc="compile enigma's native CPU kernels with the system C compiler and "
                                       "use them (false: torch's kernels only)")


@attrs.define
class ServerConfig:
    """How ``enigma serve`` listens."""

    host: str = setting("127.0.0.1", allowed="a host name or IP address",
                        check=lambda v: bool(v) and " " not in v, doc="address to bind")
    port: int = setting(11500, allowed="an integer from 1 to 65535",
                        check=lambda v: 1 <= v <= 65535, doc="TCP port")
    rate_limit: int = setting(0, allowed="requests per minute, 0 for no limit", check=lambda v: v >= 0,
                              doc="default requests/min for each API key without its own limit")
    ip_rate_limit: int = setting(0, allowed="requests per minute, 0 for no limit", check=lambda v: v >= 0,
                                 doc="requests/min from one client address")
    token_rate_limit: int = setting(0, allowed="tokens per minute, 0 for no limit", check=lambda v: v >= 0,
                                    doc="default prompt+generated tokens/min for each API key")
    ip_token_rate_limit: int = setting(0, allowed="tokens per minute, 0 for no limit", check=lambda v: v >= 0,
                                       doc="prompt+generated tokens/min from one client address")


@attrs.define
class ModelsConfig:
    """Which models commands use."""

    default: str = setting("enigma-tiny", allowed="a model name such as enigma-tiny or llama3:8b",
                           check=_is_name, doc="model used when a command names none")


@attrs.define
class Config:
    """All of enigma's settings, one attribute per section."""

    engine: EngineConfig = attrs.field(factory=EngineConfig)
    server: ServerConfig = attrs.field(factory=ServerConfig)
    models: ModelsConfig = attrs.field(factory=ModelsConfig)


for _cls in (EngineConfig, ServerConfig, ModelsConfig, Config):
    attrs.resolve_types(_cls)

SECTIONS: dict[str, type] = {field.name: field.type for field in attrs.fields(Config)}
PLUGIN_SECTION = "plugins"


@attrs.frozen
class Source:
    """Where a value came from."""

    kind: str
    """"default", "file", "env" or "command line"."""
    path: Path | None = None
    line: int | None = None
    variable: str | None = None

    def __str__(self) -> str:
        if self.kind == "file":
            return f"config file {self.path}" + (f", line {self.line}" if self.line else "")
        if self.kind == "env":
            return f"environment variable {self.variable}"
        return f"the {self.kind}"


class Schema:
    """The sections there are: the kernel's, and ``plugins.<name>`` for each plugin with settings."""

    def __init__(self, plugin_settings: Mapping[str, type] | None = None) -> None:
        self.plugin_settings = {name: resolved(cls) for name, cls in (plugin_settings or {}).items()}
        self.sections: dict[str, type] = {**SECTIONS, **{f"{PLUGIN_SECTION}.{name}": cls
                                                         for name, cls in self.plugin_settings.items()}}

    def keys(self) -> list[str]:
        return [f"{section}.{field.name}" for section, cls in self.sections.items() for field in attrs.fields(cls)]

    def split(self, key: str, where: Source | None = None) -> tuple[str, str]:
        """``"engine.dtype"`` -> ``("engine", "dtype")``; ``"plugins.rag.store"`` -> ``("plugins.rag", "store")``.

        An unknown key is a ConfigError naming it (and ``where`` it was found) and the keys there are."""
        section, _, name = key.rpartition(".")
        at = f" in {where}" if where is not None else ""
        if section in self.sections and name in attrs.fields_dict(self.sections[section]):
            return section, name
        if section.startswith(PLUGIN_SECTION + ".") and section in self.sections:
            plugin = section.partition(".")[2]
            allowed = ", ".join(field.name for field in attrs.fields(self.sections[section]))
            raise ConfigError(f"unknown config key {key!r}{at}: plugin {plugin!r} has no setting {name!r}; "
                              f"its settings are: {allowed}")
        if section.startswith(PLUGIN_SECTION + "."):
            plugin = section.partition(".")[2]
            with_settings = ", ".join(sorted(self.plugin_settings)) or "none"
            raise ConfigError(f"unknown config key {key!r}{at}: no installed plugin {plugin!r} has settings "
                              f"(plugins with settings: {with_settings})")
        raise ConfigError(f"unknown config key {key!r}{at}; the keys are: {', '.join(self.keys())}")

    def field(self, key: str) -> attrs.Attribute:
        section, name = self.split(key)
        return attrs.fields_dict(self.sections[section])[name]

    def plugin_for_variable(self, upper_name: str) -> str | None:
        """The plugin an ``ENIGMA_PLUGINS__<NAME>__...`` variable means."""
        for plugin in self.plugin_settings:
            if plugin.upper().replace("-", "_") == upper_name:
                return plugin
        return None


@attrs.frozen
class LoadedConfig:
    """A config and where each of its values came from."""

    config: Config
    sources: dict[str, Source]
    """``"section.key"`` -> :class:`Source`, for every key (``"plugins.<name>.key"`` for plugins')."""
    file: Path
    plugins: dict[str, Any] = attrs.field(factory=dict)
    """Plugin name -> its settings (an instance of the class it declared)."""
    schema: Schema = attrs.field(factory=Schema, eq=False, repr=False)
    """The sections and keys it was read against."""

    def get(self, key: str) -> Any:
        """The value of ``"section.key"`` (or ``"plugins.<name>.key"``)."""
        section, name = self.schema.split(key)
        if section.startswith(PLUGIN_SECTION + "."):
            return getattr(self.plugins[section.partition(".")[2]], name)
        return getattr(getattr(self.config, section), name)

    def items(self) -> list[tuple[str, Any, Source]]:
        """(key, value, source) for every key, in declaration order (the kernel's, then plugins')."""
        return [(key, self.get(key), self.sources[key]) for key in self.schema.keys()]


def resolved(cls: type) -> type:
    """``cls`` with string annotations (``from __future__ import annotations``) turned into types."""
    return attrs.resolve_types(cls)


def all_keys() -> list[str]:
    """Every ``"section.key"`` of the kernel."""
    return Schema().keys()


def split_key(key: str) -> tuple[str, str]:
    """``"engine.dtype"`` -> ``("engine", "dtype")``, or a ConfigError listing the keys."""
    return Schema(installed_plugin_settings()).split(key)


def installed_plugin_settings() -> dict[str, type]:
    """Plugin name -> settings class, for the plugins loaded in this process."""
    from enigma.plugins import get_host

    return dict(get_host().settings_classes)


# ------------------------------------------------------------------ converting

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _to_bool(value: Any, _type: type) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError("not a boolean")


def _to_int(value: Any, _type: type) -> int:
    if isinstance(value, bool):
        raise ValueError("not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise ValueError("not an integer")


def _to_str(value: Any, _type: type) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError("not a string")


converter = cattrs.Converter(forbid_extra_keys=True)
converter.register_structure_hook(bool, _to_bool)
converter.register_structure_hook(int, _to_int)
converter.register_structure_hook(str, _to_str)


def check_value(key: str, value: Any, source: Source, schema: Schema | None = None) -> Any:
    """Convert ``value`` to the type of ``key`` and check it; return the converted value."""
    schema = schema or Schema(installed_plugin_settings())
    return check_field(key, schema.field(key), value, source)


def check_field(key: str, field: attrs.Attribute, value: Any, source: Source) -> Any:
    """Convert ``value`` to an attrs ``field``'s type and check it (its ``setting`` check, its
    validator); a ConfigError naming ``key``, the value, its source and what is allowed otherwise."""
    allowed = field.metadata.get("allowed") or _describe_type(field.type)
    try:
        converted = converter.structure(value, field.type)
        if field.validator is not None:
            field.validator(None, field, converted)
    except (ValueError, TypeError, ConfigError, cattrs.BaseValidationError):
        ok = False
    else:
        ok = field.metadata["check"](converted) if "check" in field.metadata else True
    if not ok:
        raise ConfigError(f"{key} = {value!r} (from {source}) is invalid: expected {allowed}")
    return converted


def _describe_type(annotation: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(annotation, f"a value of type {getattr(annotation, '__name__', annotation)}")


converter.register_structure_hook(float, lambda value, _type: _to_float(value))


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("not a number")
    return float(value)


# ------------------------------------------------------------------ reading

def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return "yaml"
    if suffix == ".json":
        return "json"
    return "toml"


def _parse(path: Path, text: str) -> dict[str, Any]:
    fmt = _format_of(path)
    try:
        if fmt == "toml":
            data = tomllib.loads(text)
        elif fmt == "json":
            data = json.loads(text) if text.strip() else {}
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # each parser has its own error type; all carry a position
        raise ConfigError(f"config file {path} is not valid {fmt.upper()}: {exc}; fix or remove it") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def _locate(path: Path, text: str, section: str, key: str | None) -> int | None:
    """1-based line of ``section`` (or of ``key`` within it) in the file's text."""
    if _format_of(path) == "yaml":
        import yaml

        try:
            root = yaml.compose(text)
        except yaml.YAMLError:
            return None
        for section_node, value_node in getattr(root, "value", []):
            if section_node.value == section:
                if key is None:
                    return section_node.start_mark.line + 1
                for key_node, _ in getattr(value_node, "value", []):
                    if key_node.value == key:
                        return key_node.start_mark.line + 1
        return None
    if _format_of(path) == "json":
        section_re = re.compile(rf'"{re.escape(section)}"\s*:')
        key_re = re.compile(rf'"{re.escape(key)}"\s*:') if key else None
    else:
        section_re = re.compile(rf"^\s*\[\s*{re.escape(section)}\s*\]")
        key_re = re.compile(rf"^\s*{re.escape(key)}\s*=") if key else None
    in_section = False
    for number, line in enumerate(text.splitlines(), start=1):
        if not in_section and section_re.search(line):
            if key_re is None:
                return number
            in_section = True
        elif in_section and key_re is not None and key_re.search(line):
            return number
    return None


def _from_file(path: Path, schema: Schema, values: dict[str, Any], sources: dict[str, Source]) -> None:
    text = path.read_text(encoding="utf-8")
    data = _parse(path, text)
    for section, body in data.items():
        where = Source("file", path, _locate(path, text, section, None))
        if not isinstance(body, dict):
            raise ConfigError(f"config section {section!r} in {where} must be a table of keys")
        if section == PLUGIN_SECTION:
            for plugin, settings in body.items():
                if not isinstance(settings, dict):
                    raise ConfigError(f"config section [plugins.{plugin}] in {where} must be a table of keys")
                if plugin not in schema.plugin_settings:
                    logger.warning("config section [plugins.%s] in %s is ignored: no installed plugin %r has "
                                   "settings", plugin, path, plugin)
                    continue
                for name, value in settings.items():
                    key = f"{PLUGIN_SECTION}.{plugin}.{name}"
                    source = Source("file", path, _locate(path, text, f"{PLUGIN_SECTION}.{plugin}", name))
                    schema.split(key, source)
                    values[key] = check_value(key, value, source, schema)
                    sources[key] = source
            continue
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r} in {where}; the sections are: "
                              f"{', '.join([*SECTIONS, PLUGIN_SECTION + '.<plugin>'])}")
        for name, value in body.items():
            key = f"{section}.{name}"
            source = Source("file", path, _locate(path, text, section, name))
            schema.split(key, source)
            values[key] = check_value(key, value, source, schema)
            sources[key] = source


def _from_env(environ: Mapping[str, str], schema: Schema, values: dict[str, Any],
              sources: dict[str, Source]) -> None:
    for variable, raw in sorted(environ.items()):
        if not variable.startswith(ENV_PREFIX) or ENV_SEPARATOR not in variable:
            continue
        parts = variable[len(ENV_PREFIX):].split(ENV_SEPARATOR)
        source = Source("env", variable=variable)
        if parts[0] == PLUGIN_SECTION.upper():
            plugin = schema.plugin_for_variable(parts[1]) if len(parts) == 3 else None
            if plugin is None:
                raise ConfigError(f"environment variable {variable} names no plugin setting (expected "
                                  f"ENIGMA_PLUGINS__<PLUGIN>__<KEY>; plugins with settings: "
                                  f"{', '.join(sorted(schema.plugin_settings)) or 'none'}); unset it or fix its name")
            key = f"{PLUGIN_SECTION}.{plugin}.{parts[2].lower()}"
        else:
            key = ".".join(part.lower() for part in parts)
            if key not in schema.keys():
                raise ConfigError(f"environment variable {variable} names no config key ({key!r}); "
                                  f"the keys are: {', '.join(all_keys())}; unset it or fix its name")
        values[key] = check_value(key, raw, source, schema)
        sources[key] = source


def load_config(*, paths: Paths | None = None, environ: Mapping[str, str] | None = None,
                plugin_settings: Mapping[str, type] | None = None) -> LoadedConfig:
    """Read the effective configuration: defaults < file < environment.

    ``plugin_settings`` (plugin name -> settings class) defaults to what the
    loaded plugins declared.
    """
    env = os.environ if environ is None else environ
    paths = paths or get_paths(env)
    schema = Schema(installed_plugin_settings() if plugin_settings is None else plugin_settings)
    values: dict[str, Any] = {}
    sources = {key: Source("default") for key in schema.keys()}
    file = paths.config_file
    if file.exists():
        _from_file(file, schema, values, sources)
    elif paths.config_file_override is not None:
        raise ConfigError(f"config file {file} (from ENIGMA_CONFIG) does not exist; "
                          f"create it or unset ENIGMA_CONFIG")
    _from_env(env, schema, values, sources)
    nested: dict[str, dict[str, Any]] = {section: {} for section in schema.sections}
    for key, value in values.items():
        section, name = schema.split(key)
        nested[section][name] = value
    config = converter.structure({section: nested[section] for section in SECTIONS}, Config)
    plugins = {name: cls(**nested[f"{PLUGIN_SECTION}.{name}"]) for name, cls in schema.plugin_settings.items()}
    return LoadedConfig(config, sources, file, plugins, schema)


_SETTINGS_CACHE: dict[tuple, LoadedConfig] = {}


def plugin_settings(name: str) -> Any:
    """The effective settings of plugin ``name`` (what its ``enigma_plugin_settings`` class declares).

    Cheap enough for a request path: the config is read again only when the
    file or an ``ENIGMA_*`` variable changed."""
    paths = get_paths()
    try:
        stat = paths.config_file.stat()
        version: tuple = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    except OSError:
        version = ()
    key = (str(paths.config_file), version, tuple(installed_plugin_settings().items()),
           tuple(sorted(item for item in os.environ.items() if item[0].startswith(ENV_PREFIX))))
    loaded = _SETTINGS_CACHE.get(key)
    if loaded is None:
        _SETTINGS_CACHE.clear()
        loaded = _SETTINGS_CACHE[key] = load_config()
    if name not in loaded.plugins:
        raise NotFoundError(f"plugin {name!r} declares no settings (plugins with settings: "
                            f"{', '.join(sorted(loaded.plugins)) or 'none'})")
    return loaded.plugins[name]


# ------------------------------------------------------------------ writing

def set_value(key: str, value: str, *, paths: Paths | None = None) -> Path:
    """Check ``value`` and write ``key = value`` into the config file, atomically.

    The file keeps its format (TOML, JSON or YAML) and its other settings.
    Returns the file written.
    """
    paths = paths or get_paths()
    file = paths.config_file
    schema = Schema(installed_plugin_settings())
    converted = check_value(key, value, Source("command line"), schema)
    section, name = schema.split(key)
    data = _parse(file, file.read_text(encoding="utf-8")) if file.exists() else {}
    table = data
    for part in section.split("."):
        table = table.setdefault(part, {})
    table[name] = converted
    fmt = _format_of(file)
    if fmt == "toml":
        import tomli_w

        text = tomli_w.dumps(data)
    elif fmt == "json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    atomic_write_text(file, text)
    return file
