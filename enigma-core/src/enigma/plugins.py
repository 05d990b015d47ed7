"""Discovering plugins and registering them: stevedore finds, pluggy calls.

Every entry point in the ``enigma`` group names a plugin module — enigma's own
builtins included. :class:`PluginHost` loads each enabled one with stevedore,
registers it with one pluggy ``PluginManager`` and lets it fill the
:class:`~enigma.registry.Registry`. A plugin that fails to import, names an
unknown hook or raises while registering is recorded and left out; the rest
carry on.

Environment controls (read when a host loads):

``ENIGMA_LOAD_PLUGINS=a,b``     load only these (an allow-list)
``ENIGMA_DISABLE_PLUGINS=a,b``  never load these
``ENIGMA_STRICT_PLUGINS=1``     re-raise plugin failures (for plugin authors)
``ENIGMA_TRACE_PLUGINS=1``      trace every hook call to stderr
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any

import attrs
import pluggy

from enigma import hookspecs
from enigma.errors import PluginError
from enigma.kinds import KINDS, AvailabilityCheck
from enigma.registry import CORE_DISTRIBUTION, Implementation, Registry

ENTRY_POINT_GROUP = "enigma"

logger = logging.getLogger("enigma.plugins")


@attrs.define(kw_only=True)
class PluginRecord:
    """What ``enigma plugins`` shows about one plugin."""

    name: str
    """The entry-point name, the plugin's user-visible name."""
    module: str
    distribution: str | None = None
    version: str | None = None
    status: str = "loaded"
    """"loaded", "disabled" or "failed"."""
    errors: list[str] = attrs.field(factory=list)
    """Why it failed to load, and any later hook failures."""

    @property
    def builtin(self) -> bool:
        return self.distribution == CORE_DISTRIBUTION


def _split_names(value: str | None) -> set[str]:
    return {part.strip() for part in (value or "").split(",") if part.strip()}


def _env_flag(name: str, environ: Mapping[str, str]) -> bool:
    return environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _describe_exception(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def installed_entry_points() -> dict[str, list[tuple[str, str, str]]]:
    """Entry-point name -> [(distribution, version, module)], in sys.path order."""
    owners: dict[str, list[tuple[str, str, str]]] = {}
    seen: set[str] = set()
    for dist in importlib.metadata.distributions():
        # The folder-derived name is cheap; reading METADATA for each of
        # ~100 distributions is what would make startup slow.
        normalized = getattr(dist, "_normalized_name", None) or (dist.metadata["Name"] or "")
        normalized = normalized.lower().replace("_", "-")
        if normalized in seen:  # shadowed copy further down sys.path
            continue
        seen.add(normalized)
        ours = [ep for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP]
        if ours:
            dist_name = dist.metadata["Name"] or normalized
            for entry_point in ours:
                owners.setdefault(entry_point.name, []).append((dist_name, dist.version, entry_point.value))
    return owners


class _Register:
    """The ``register`` callback handed to one plugin for one kind."""

    def __init__(self, host: PluginHost, kind: str, record: PluginRecord) -> None:
        self._host = host
        self._kind = kind
        self._record = record

    def __call__(
        self,
        name: str,
        factory: Callable[..., Any] | str,
        *,
        priority: int = 0,
        available: AvailabilityCheck | None = None,
        summary: str = "",
        options: type | None = None,
        devices: Sequence[str] = (),
    ) -> None:
        self._host.registry.add(
            Implementation(
                kind=self._kind,
                name=name,
                factory=factory,
                plugin=self._record.name,
                distribution=self._record.distribution,
                priority=priority,
                summary=summary,
                available_check=available,
                options=options,
                devices=tuple(devices),
            )
        )


class PluginHost:
    """One pluggy PluginManager, the plugins in it and the registry they filled."""

    def __init__(self, *, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.strict = _env_flag("ENIGMA_STRICT_PLUGINS", env)
        self.manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.manager.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.records: dict[str, PluginRecord] = {}
        self.settings_classes: dict[str, type] = {}
        """Plugin name -> the attrs class its ``enigma_plugin_settings`` hook declared."""
        self._trace = _env_flag("ENIGMA_TRACE_PLUGINS", env)
        if self._trace:
            self.manager.trace.root.setwriter(sys.stderr.write)
            self.manager.enable_tracing()

    @property
    def hook(self) -> Any:
        """``pm.hook``: call a hook on every plugin, pluggy's way."""
        return self.manager.hook

    # ------------------------------------------------------------ loading

    def load_entry_points(
        self,
        *,
        load: Iterable[str] | None = None,
        disable: Iterable[str] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """Discover and register every enabled plugin of the ``enigma`` group.

        ``load`` (an allow-list) and ``disable`` default to the environment
        variables ``ENIGMA_LOAD_PLUGINS`` and ``ENIGMA_DISABLE_PLUGINS``.
        """
        from stevedore import NamedExtensionManager

        env = os.environ if environ is None else environ
        allow = set(load) if load is not None else _split_names(env.get("ENIGMA_LOAD_PLUGINS"))
        block = set(disable) if disable is not None else _split_names(env.get("ENIGMA_DISABLE_PLUGINS"))

        owners = installed_entry_points()
        enabled: list[str] = []
        for name in sorted(owners):
            (dist_name, version, module), *others = owners[name]
            record = PluginRecord(name=name, module=module, distribution=dist_name, version=version)
            self.records[name] = record
            if others:
                rivals = ", ".join(dist for dist, _, _ in owners[name])
                self._fail(record, PluginError(
                    f"entry point '{name}' is declared by several distributions ({rivals}); "
                    f"uninstall all but one"
                ))
            elif name in block or (allow and name not in allow):
                record.status = "disabled"
            else:
                enabled.append(name)

        if not enabled:
            return

        def on_load_failure(_manager: Any, entry_point: Any, exc: BaseException) -> None:
            self._fail(self.records[entry_point.name], exc)

        # stevedore memoizes entry points per namespace for the life of the
        # process; a new host must see plugins installed since the last one.
        NamedExtensionManager.ENTRY_POINT_CACHE.pop(ENTRY_POINT_GROUP, None)
        manager = NamedExtensionManager(
            namespace=ENTRY_POINT_GROUP,
            names=enabled,
            name_order=True,
            on_load_failure_callback=on_load_failure,
            on_missing_entrypoints_callback=lambda names: None,
        )
        for extension in manager.extensions:
            record = self.records[extension.name]
            if record.status != "failed":
                self._register(extension.plugin, record)

    def register_module(
        self,
        module: ModuleType | object,
        *,
        name: str,
        distribution: str | None = None,
        version: str | None = None,
    ) -> PluginRecord:
        """Register an already-imported plugin object under ``name``.

        This is the door :meth:`load_entry_points` uses for every discovered
        plugin; tests use it to run a plugin against a real kernel before it
        is installed. Returns the plugin's record (``status`` says whether it
        took).
        """
        if name in self.records and self.records[name].status == "loaded":
            raise PluginError(f"a plugin named {name!r} is already registered")
        record = PluginRecord(
            name=name,
            module=getattr(module, "__name__", type(module).__name__),
            distribution=distribution,
            version=version,
        )
        self.records[name] = record
        self._register(module, record)
        return record

    def _register(self, plugin: object, record: PluginRecord) -> None:
        try:
            self.manager.register(plugin, name=record.name)
        except Exception as exc:  # pluggy rejects bad hookimpl signatures here
            self._fail(record, exc)
            return
        try:
            self.manager.check_pending()
            for kind in KINDS:
                self._call_own(plugin, hookspecs.REGISTER_HOOKS[kind], register=_Register(self, kind, record))
            for settings in self._call_own(plugin, "enigma_plugin_settings"):
                if settings is not None:
                    if not (isinstance(settings, type) and attrs.has(settings)):
                        raise PluginError(f"enigma_plugin_settings of plugin {record.name!r} returned "
                                          f"{settings!r}; it must return an attrs class (or None)")
                    self.settings_classes[record.name] = settings
        except Exception as exc:
            self.manager.unregister(plugin)
            self.registry.remove_plugin(record.name)
            self.settings_classes.pop(record.name, None)
            self._fail(record, exc)

    def _call_own(self, plugin: object, hook_name: str, **kwargs: Any) -> list[Any]:
        return [implementation.function(**{arg: kwargs[arg] for arg in implementation.argnames})
                for implementation in getattr(self.hook, hook_name).get_hookimpls()
                if implementation.plugin is plugin]

    def _fail(self, record: PluginRecord, exc: BaseException) -> None:
        record.status = "failed"
        record.errors.append(_describe_exception(exc))
        logger.warning("plugin %r (%s) failed to load: %s; 'enigma plugins' shows it, "
                       "ENIGMA_DISABLE_PLUGINS=%s skips it", record.name,
                       record.distribution or record.module, _describe_exception(exc), record.name)
        if self.strict:
            raise exc

    # ------------------------------------------------------------ calling

    def broadcast(self, hook_name: str, **kwargs: Any) -> list[Any]:
        """Call a hook on every plugin, isolating failures.

        For hooks where one plugin's mistake must not stop the others (CLI
        commands, lifecycle events): an exception is logged and recorded on
        that plugin's entry in :attr:`records` (re-raised when strict). Calls
        run in pluggy's order; returns the non-None results.
        """
        results = []
        for implementation in reversed(getattr(self.hook, hook_name).get_hookimpls()):
            if self._trace:
                sys.stderr.write(f"enigma: {hook_name} -> plugin {implementation.plugin_name}\n")
            try:
                result = implementation.function(
                    **{arg: kwargs[arg] for arg in implementation.argnames}
                )
            except Exception as exc:
                if self.strict:
                    raise
                message = f"{hook_name} raised {_describe_exception(exc)}"
                logger.warning("plugin %r: %s", implementation.plugin_name, message)
                record = self.records.get(implementation.plugin_name)
                if record is not None:
                    record.errors.append(message)
                continue
            if result is not None:
                results.append(result)
        return results

    # ------------------------------------------------------------ selection

    def select(self, kind: str, name: str = "auto", *, device: str | None = None) -> Implementation:
        """See :meth:`enigma.registry.Registry.select`."""
        return self.registry.select(kind, name, device=device)

    def create(self, kind: str, name: str = "auto", **kwargs: Any) -> Any:
        """See :meth:`enigma.registry.Registry.create`."""
        return self.registry.create(kind, name, **kwargs)


_host: PluginHost | None = None
_host_lock = threading.Lock()


def load_plugins(*, environ: Mapping[str, str] | None = None) -> PluginHost:
    """A new host with every enabled installed plugin loaded."""
    host = PluginHost(environ=environ)
    host.load_entry_points(environ=environ)
    return host


def get_host() -> PluginHost:
    """The process-wide host, loaded on first use."""
    global _host
    with _host_lock:
        if _host is None:
            _host = load_plugins()
        return _host


@contextlib.contextmanager
def use_host(host: PluginHost) -> Iterator[PluginHost]:
    """Make ``host`` the process-wide host (what ``LLM``, the loader and the server use) for a block."""
    global _host
    with _host_lock:
        previous, _host = _host, host
    try:
        yield host
    finally:
        with _host_lock:
            _host = previous


def reset_host() -> None:
    """Forget the process-wide host, so the next :func:`get_host` loads again."""
    global _host
    with _host_lock:
        _host = None
