"""pytest fixtures for testing enigma plugins against a real kernel.

Installed as a ``pytest11`` plugin with enigma-core, so any test suite that
has enigma-core installed gets these fixtures:

``enigma_home``
    an empty ``ENIGMA_HOME`` for the test (config, store, cache), so tests
    never touch the user's files.
``plugin_host``
    a fresh :class:`~enigma.plugins.PluginHost` loaded from the installed
    entry points, exactly as ``enigma`` loads them.
``make_plugin_host``
    ``make_plugin_host(my_plugin_module, builtins=True)``: a host with your
    (not yet installed) plugin registered beside the builtins; assert on
    ``host.records``, ``host.registry`` and ``host.select(...)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from enigma.plugins import CORE_DISTRIBUTION, PluginHost, installed_entry_points, load_plugins, reset_host


@pytest.fixture
def enigma_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An isolated ENIGMA_HOME; enigma's environment variables cleared."""
    home = tmp_path / "enigma-home"
    home.mkdir()
    for name in list(os.environ):
        if name.startswith("ENIGMA_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ENIGMA_HOME", str(home))
    reset_host()
    yield home
    reset_host()


@pytest.fixture
def plugin_host(enigma_home: Path) -> PluginHost:
    """A host loaded from the installed ``enigma`` entry points."""
    return load_plugins()


@pytest.fixture
def make_plugin_host(enigma_home: Path) -> Callable[..., PluginHost]:
    """Build a host holding the given plugin modules (and, by default, the builtins)."""

    def make(*modules: ModuleType, builtins: bool = True) -> PluginHost:
        host = PluginHost()
        if builtins:
            host.load_entry_points(load=[name for name, owners in installed_entry_points().items()
                                         if owners[0][0] == CORE_DISTRIBUTION])
        for module in modules:
            host.register_module(module, name=module.__name__.rsplit(".", 1)[-1])
        return host

    return make
