"""``enigma config``: show, get and set settings; say where the file is."""

from __future__ import annotations

import json

import click


@click.group()
def config() -> None:
    """Read and change enigma's settings.

    Settings come from defaults, then the config file, then environment
    variables ENIGMA_<SECTION>__<KEY> (which win).

    \b
    Examples:
      enigma config show
      enigma config get server.port
      enigma config set engine.dtype bfloat16
      ENIGMA_SERVER__PORT=8080 enigma config get server.port
    """


@config.command(epilog="\b\nExamples:\n  enigma config show\n  enigma config show --json")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: key -> {value, source}.")
def show(as_json: bool) -> None:
    """Every setting, its value and where it came from."""
    from enigma.config import load_config

    loaded = load_config()
    if as_json:
        click.echo(json.dumps({key: {"value": value, "source": str(source)}
                               for key, value, source in loaded.items()}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Settings (file: {loaded.file})", title_justify="left")
    for column in ("key", "value", "source"):
        table.add_column(column)
    for key, value, source in loaded.items():
        table.add_row(key, str(value), str(source))
    Console(soft_wrap=False).print(table)


@config.command(epilog="\b\nExamples:\n  enigma config get models.default\n"
                       "  ENIGMA_SERVER__PORT=8080 enigma config get server.port")
@click.argument("key")
def get(key: str) -> None:
    """Print the value of KEY (section.key)."""
    from enigma.config import load_config

    click.echo(load_config().get(key))


@config.command(name="set", epilog="\b\nExamples:\n  enigma config set engine.dtype bfloat16\n"
                                   "  enigma config set models.default qwen:0.5b")
@click.argument("key")
@click.argument("value")
def set_(key: str, value: str) -> None:
    """Write KEY = VALUE into the config file."""
    from enigma.config import load_config, set_value

    file = set_value(key, value)
    effective = load_config()
    click.echo(f"{key} = {effective.get(key)!r} written to {file}")
    source = effective.sources[key]
    if source.kind == "env":
        click.echo(f"note: {source} overrides it", err=True)


@config.command(epilog="\b\nExamples:\n  enigma config path\n  $EDITOR \"$(enigma config path)\"")
def path() -> None:
    """Print the config file's path (it may not exist yet)."""
    from enigma.paths import get_paths

    click.echo(get_paths().config_file)
