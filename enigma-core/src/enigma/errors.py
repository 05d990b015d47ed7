"""The errors a user of enigma can meet.

Every error a user can cause is an :class:`EnigmaError`; its message names the
input, says why it is wrong and what to do. The CLI prints it without a
traceback; the HTTP API maps it to OpenAI's error shape.
"""

from __future__ import annotations


class EnigmaError(Exception):
    """Root of all errors enigma raises on purpose."""


class PluginError(EnigmaError):
    """A plugin could not be loaded or registered something invalid."""


class NotFoundError(EnigmaError):
    """A named thing (model, implementation, config key) does not exist."""


class NotAvailableError(EnigmaError):
    """A named implementation exists but cannot run here (no CUDA, no Metal...)."""


class ConfigError(EnigmaError):
    """A configuration value is invalid; the message names key, value and source."""


class BadRequestError(EnigmaError):
    """A request's arguments are invalid."""
