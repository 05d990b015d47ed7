"""Names a package exports but imports on first use (PEP 562), so importing it stays cheap.

Plugin packages are imported whenever plugins load (``enigma --help`` too);
their heavy modules (torch) must wait until somebody uses them:

    __getattr__ = lazy_exports(__name__, {"LoRAConfig": "enigma_lora.config"})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_exports(module: str, names: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``module`` that imports ``names[name]`` (a module path) when
    ``name`` is first asked for, and keeps it in the module from then on."""

    def __getattr__(name: str) -> object:
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name]), name)
        setattr(sys.modules[module], name, value)
        return value

    return __getattr__
