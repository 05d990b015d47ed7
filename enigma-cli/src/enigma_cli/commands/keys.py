"""``enigma keys``: API keys for ``enigma serve``."""

from __future__ import annotations

import json

import click


@click.group(epilog="""
\b
Examples:
  enigma keys create laptop
  enigma keys create ci --rate-limit 60/min
  enigma keys list
  enigma keys revoke laptop
""")
def keys() -> None:
    """Create, list and revoke API keys (only their hashes are stored)."""


def _rate(value: str | None) -> int | None:
    if value is None:
        return None
    number = value.removesuffix("/min").removesuffix("/m")
    if not number.isdigit():
        raise click.BadParameter(f"{value!r}: expected requests per minute, as in 60/min")
    return int(number)


@keys.command(epilog="\b\nExamples:\n  enigma keys create laptop\n  enigma keys create ci --rate-limit 60/min")
@click.argument("name")
@click.option("--rate-limit", help="Requests per minute for this key, as in 60/min (default: server.rate_limit).")
@click.option("--token-limit", help="Prompt+generated tokens per minute, as in 20000/min "
                                    "(default: server.token_rate_limit).")
def create(name: str, rate_limit: str | None, token_limit: str | None) -> None:
    """Create a key; it is printed once and never stored."""
    from enigma.server.keys import KeyStore

    key = KeyStore().create(name, rate_limit=_rate(rate_limit), token_limit=_rate(token_limit))
    click.echo(key)
    click.echo(f"Key {name!r} created. Keep it now: enigma stores only its hash.", err=True)


@keys.command("list", epilog="\b\nExamples:\n  enigma keys list\n  enigma keys list --json")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_keys(as_json: bool) -> None:
    """List keys: name, first characters, created, rate limit."""
    from enigma.server.keys import KeyStore

    entries = KeyStore().as_dict()
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    if not entries:
        click.echo("No API keys: `enigma serve` accepts every request. Create one with `enigma keys create NAME`.")
        return
    for entry in entries:
        limit = f"{entry['rate_limit']}/min" if entry["rate_limit"] else "server default"
        click.echo(f"{entry['name']:<20} {entry['key']:<18} {entry['created']}  {limit}")


@keys.command(epilog="\b\nExamples:\n  enigma keys revoke laptop")
@click.argument("name")
def revoke(name: str) -> None:
    """Revoke a key: requests with it are refused at once."""
    from enigma.server.keys import KeyStore

    KeyStore().revoke(name)
    click.echo(f"Key {name!r} revoked.")
