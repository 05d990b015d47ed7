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


def speculative_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--draft`` and ``--num-speculative-tokens``: speculative decoding (the first model, for ``serve``)."""
    command = click.option("--num-speculative-tokens", type=click.IntRange(1, 32), default=None, metavar="K",
                           help="Most draft tokens verified per step (with --draft) [4; adaptive below it].")(command)
    return click.option("--draft", metavar="MODEL", default=None,
                        help="Speculative decoding: a draft model with the model's tokenizer, [ngram] (prompt "
                             "lookup) or [self] (the model's first layers).")(command)


def speculative_options(draft: str | None, num_speculative_tokens: int | None) -> dict[str, Any]:
    """SpeculativeConfig fields from the two flags ({} when --draft is not given)."""
    if draft is None:
        if num_speculative_tokens is not None:
            raise click.UsageError("--num-speculative-tokens needs --draft (a draft model, [ngram] or [self])")
        return {}
    from enigma.speculative import SpeculativeConfig

    config = SpeculativeConfig.build(draft, num_speculative_tokens)
    return {key: value for key, value in {"method": config.method, "model": config.model,
                                          "num_speculative_tokens": num_speculative_tokens}.items()
            if value is not None}
