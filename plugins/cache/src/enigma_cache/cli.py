"""``enigma cache``: what the response cache holds, and emptying it."""

from __future__ import annotations

import json

import click


@click.group()
def cache() -> None:
    """The response cache ([plugins.cache]): its levels, and clearing them."""


def _open():
    from enigma_cache.responses import ResponseCache
    from enigma_cache.settings import cache_settings

    return ResponseCache(cache_settings())


@cache.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(as_json: bool) -> None:
    """Each level's entries, bytes and state, as this machine's settings name them."""
    from enigma_cache.settings import cache_settings

    settings = cache_settings()
    opened = _open()
    try:
        report = opened.cache.status()
    finally:
        opened.close()
    report["enabled"] = settings.enabled
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"response cache: {'on' if settings.enabled else 'off'} ([plugins.cache] enabled), "
               f"ttl {settings.ttl_s:g} s, {report['status']}")
    for name, level in report["levels"].items():
        details = ", ".join(f"{k} {v}" for k, v in level.items() if k != "status")
        click.echo(f"  {name:<7} {level['status']:<5} {details}")


@cache.command()
@click.option("--tenant", default=None, help="Only this API key's answers (its name).")
def clear(tenant: str | None) -> None:
    """Remove cached answers from every level (memory is per server process: restart it)."""
    from enigma_cache.keys import tenant_prefix

    opened = _open()
    try:
        removed = opened.cache.clear(tenant_prefix(tenant) if tenant is not None else "enigma:resp:")
    finally:
        opened.close()
    click.echo("removed " + ", ".join(f"{count} from {name}" for name, count in removed.items()))
