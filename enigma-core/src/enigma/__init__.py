"""enigma: a local-first LLM engine whose every part is a plugin.

The kernel's public names are re-exported here. Heavy modules (torch, the
runtime) are imported only when used, so ``import enigma`` stays cheap.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from enigma.errors import (
    BadRequestError,
    ConfigError,
    EnigmaError,
    NotAvailableError,
    NotFoundError,
    PluginError,
)
from enigma.hookspecs import hookimpl
from enigma.kinds import KINDS, Availability
from enigma.lazy import lazy_exports
from enigma.plugins import PluginHost, get_host

_LAZY = {
    "LLM": "enigma.llm",
    "SamplingParams": "enigma.sampling",
    "Logprob": "enigma.sampling",
    "RequestOutput": "enigma.outputs",
    "CompletionOutput": "enigma.outputs",
    "EmbeddingOutput": "enigma.outputs",
    "EmbeddingRequestOutput": "enigma.outputs",
}
"""Runtime names, imported on first use so that ``import enigma`` skips torch."""

__getattr__ = lazy_exports(__name__, _LAZY)


try:
    __version__ = version("enigma-core")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "KINDS",
    "LLM",
    "Availability",
    "BadRequestError",
    "CompletionOutput",
    "ConfigError",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "EnigmaError",
    "Logprob",
    "NotAvailableError",
    "NotFoundError",
    "PluginError",
    "PluginHost",
    "RequestOutput",
    "SamplingParams",
    "__version__",
    "get_host",
    "hookimpl",
]
