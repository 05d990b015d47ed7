"""Implementations by kind and name, and choosing one (the driver pattern).

Plugins fill the registry through the ``enigma_register_*`` hooks; callers ask
for one implementation with :meth:`Registry.select` — an explicit name wins,
``"auto"`` takes the highest-priority implementation that is available here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import attrs

from enigma.errors import NotAvailableError, NotFoundError, PluginError
from enigma.kinds import KINDS, Availability, AvailabilityCheck

AUTO = "auto"
CORE_DISTRIBUTION = "enigma-core"


@attrs.frozen(kw_only=True)
class Implementation:
    """One registered implementation of one kind."""

    kind: str
    name: str
    factory: Callable[..., Any] | str = attrs.field(repr=False)
    plugin: str
    """Entry-point name of the plugin that registered it."""
    distribution: str | None = None
    priority: int = 0
    summary: str = ""
    available_check: AvailabilityCheck | None = attrs.field(default=None, repr=False)
    options: type | None = attrs.field(default=None, repr=False)
    """An attrs class of per-use options it takes (a trainer's ``--lora-rank``), or None."""
    devices: tuple[str, ...] = ()
    """The torch device types a backend runs on (``"cuda"``, ``"cpu"``, ``"mps"``); empty: any."""

    def availability(self) -> Availability:
        """Whether it can run here; a check that raises counts as unavailable."""
        if self.available_check is None:
            return Availability.yes()
        try:
            result = self.available_check()
        except Exception as exc:  # a broken check must not break selection
            return Availability.no(f"its availability check failed: {type(exc).__name__}: {exc}")
        if isinstance(result, Availability):
            return result
        return Availability.yes() if result else Availability.no("its availability check said no")

    def load(self) -> Callable[..., Any]:
        """The factory, importing it first when registered as ``"module:attr"``."""
        if not isinstance(self.factory, str):
            return self.factory
        module_name, _, attribute = self.factory.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for part in attribute.split(".") if attribute else ():
                target = getattr(target, part)
        except (ImportError, AttributeError) as exc:
            raise PluginError(
                f"{self.kind} '{self.name}' from plugin '{self.plugin}' could not be imported "
                f"from {self.factory!r}: {exc}; reinstall {self.distribution or self.plugin}"
            ) from exc
        return target

    def create(self, **kwargs: Any) -> Any:
        """A new instance: the factory called with ``kwargs``."""
        return self.load()(**kwargs)

    @property
    def builtin(self) -> bool:
        """Registered by enigma-core itself."""
        return self.distribution == CORE_DISTRIBUTION

    @property
    def origin(self) -> str:
        """Who provides it, for messages: the distribution, else the plugin."""
        return self.distribution or self.plugin


def _device_type(device: str | None) -> str | None:
    """``"cuda"`` for ``"cuda:1"``; None for no device."""
    if device is None:
        return None
    return str(device).partition(":")[0]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise NotFoundError(f"unknown kind {kind!r}; the kinds are: {', '.join(KINDS)}")


class Registry:
    """All registered implementations, keyed by (kind, name)."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], Implementation] = {}

    def add(self, implementation: Implementation) -> None:
        """Add one; a name already taken in that kind is a :class:`PluginError`."""
        _check_kind(implementation.kind)
        if not implementation.name or implementation.name == AUTO or "," in implementation.name:
            raise PluginError(
                f"plugin '{implementation.plugin}' registered a {implementation.kind} with the "
                f"invalid name {implementation.name!r}; names are non-empty, not 'auto', no commas"
            )
        key = (implementation.kind, implementation.name)
        existing = self._by_key.get(key)
        if existing is not None:
            raise PluginError(
                f"{implementation.kind} '{implementation.name}' is registered twice: by "
                f"{existing.origin} (plugin '{existing.plugin}') and by {implementation.origin} "
                f"(plugin '{implementation.plugin}'); uninstall one or disable it with "
                f"ENIGMA_DISABLE_PLUGINS={implementation.plugin}"
            )
        self._by_key[key] = implementation

    def remove_plugin(self, plugin: str) -> None:
        """Forget everything one plugin registered (when it failed half-way)."""
        for key in [k for k, impl in self._by_key.items() if impl.plugin == plugin]:
            del self._by_key[key]

    def implementations(self, kind: str | None = None) -> list[Implementation]:
        """Registered implementations, of one kind or all, highest priority first."""
        if kind is not None:
            _check_kind(kind)
        found = [impl for impl in self._by_key.values() if kind is None or impl.kind == kind]
        return sorted(found, key=lambda impl: (KINDS.index(impl.kind), -impl.priority, not impl.builtin, impl.name))

    def get(self, kind: str, name: str) -> Implementation:
        """The implementation registered under ``name``, available or not."""
        _check_kind(kind)
        try:
            return self._by_key[(kind, name)]
        except KeyError:
            raise NotFoundError(
                f"no {kind} named {name!r} is installed; {self._describe(kind)}. Install the "
                f"plugin that provides it, or choose one of these ('enigma plugins' lists them)"
            ) from None

    def select(self, kind: str, name: str = AUTO, *, device: str | None = None) -> Implementation:
        """Choose one implementation of ``kind``.

        An explicit ``name`` must exist and be available here. ``"auto"`` picks
        the highest-priority available one; at equal priority a builtin wins,
        so installing a plugin never silently replaces enigma-core's own
        implementation (a plugin that should win says so with a higher priority). Failures list what is installed
        and why each unavailable one is unavailable.

        A ``device`` (a backend's: ``"cpu"``, ``"cuda:1"``) narrows ``"auto"`` to
        the implementations registered for its type or for any; one registered
        for that very type is taken even where its availability says "not by
        auto" (``torch-cpu`` on a machine with a GPU): naming the device settles
        what that flag defers to.
        """
        if name != AUTO:
            implementation = self.get(kind, name)
            availability = implementation.availability()
            if not availability:
                raise NotAvailableError(
                    f"{kind} {name!r} (from {implementation.origin}) is not available here: "
                    f"{availability.reason}. {_sentence(self._describe(kind))}"
                )
            return implementation
        available = [impl for impl in self.implementations(kind) if impl.availability()]
        device_type = _device_type(device)
        if device_type is not None:
            available = [impl for impl in available if not impl.devices or device_type in impl.devices]
        for implementation in available:
            if implementation.availability().auto or device_type in implementation.devices:
                return implementation
        if available:
            return available[0]
        raise NotAvailableError(f"no {kind} is available here; {self._describe(kind)}")

    def create(self, kind: str, name: str = AUTO, **kwargs: Any) -> Any:
        """``select(kind, name)`` and call its factory with ``kwargs`` (a backend's ``device`` also chooses
        among them under ``"auto"``)."""
        device = kwargs.get("device") if kind == "backend" else None
        return self.select(kind, name, device=device).create(**kwargs)

    def _describe(self, kind: str) -> str:
        implementations = self.implementations(kind)
        if not implementations:
            return f"no {kind} is installed at all"
        parts = []
        for impl in implementations:
            availability = impl.availability()
            state = ("available" if availability.auto else f"available when named: {availability.reason}") \
                if availability else f"unavailable: {availability.reason}"
            parts.append(f"{impl.name} (from {impl.origin}; {state})")
        return f"installed {kind}s: " + "; ".join(parts)


def _sentence(text: str) -> str:
    """``text`` with its first letter in capitals and the rest as it was (``str.capitalize`` lowers the rest,
    which turned names like 'CUDA' in the reasons it lists into 'cuda')."""
    return text[:1].upper() + text[1:]
