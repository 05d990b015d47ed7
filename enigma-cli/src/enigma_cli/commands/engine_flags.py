"""``--backend``, ``--scheduler``, ``--cache``: the engine's implementations, named on the command line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


def engine_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the three flags; each overrides its ``engine.*`` setting (``enigma plugins`` lists the names)."""
    for kind, key in (("cache", "KV cache"), ("scheduler", "scheduler"), ("backend", "backend")):
        command = click.option(f"--{kind}", metavar="NAME",
                               help=f"{key.capitalize()} implementation [config engine.{kind}: auto].")(command)
    return command
