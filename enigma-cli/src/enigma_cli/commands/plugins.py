"""``enigma plugins``: what is installed, what it provides, what can run here."""

from __future__ import annotations

import json
import sys

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def plugins(as_json: bool) -> None:
    """List plugins, the implementations they provide, and their availability.

    \b
    Examples:
      enigma plugins
      enigma plugins --json
      ENIGMA_DISABLE_PLUGINS=cuda-paged enigma plugins
    """
    from enigma.plugins import get_host

    host = get_host()
    implementations = host.registry.implementations()
    availability = {(impl.kind, impl.name): impl.availability() for impl in implementations}

    if as_json:
        click.echo(json.dumps({
            "plugins": [
                {
                    "name": record.name,
                    "module": record.module,
                    "distribution": record.distribution,
                    "version": record.version,
                    "builtin": record.builtin,
                    "status": record.status,
                    "errors": record.errors,
                    "provides": [f"{impl.kind}:{impl.name}" for impl in implementations
                                 if impl.plugin == record.name],
                }
                for record in sorted(host.records.values(), key=lambda r: r.name)
            ],
            "implementations": [
                {
                    "kind": impl.kind,
                    "name": impl.name,
                    "plugin": impl.plugin,
                    "distribution": impl.distribution,
                    "priority": impl.priority,
                    "available": availability[(impl.kind, impl.name)].ok,
                    "reason": availability[(impl.kind, impl.name)].reason,
                    "summary": impl.summary,
                }
                for impl in implementations
            ],
        }, indent=2))
        return

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # Piped output has no terminal width to honour: use a wide one rather than
    # rich's 80 columns, so names are never cut.
    console = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 160)
    table = Table(title="Plugins", title_justify="left")
    for column in ("name", "distribution", "version", "provides", "status"):
        table.add_column(column)
    for record in sorted(host.records.values(), key=lambda r: r.name):
        provides = ", ".join(f"{impl.kind}:{impl.name}" for impl in implementations
                             if impl.plugin == record.name)
        status = record.status
        if record.status == "loaded" and not record.errors:
            status = "[green]loaded[/green]"
        elif record.status == "failed":
            status = "[red]failed[/red]"
        if record.errors:
            status += "\n" + "\n".join(escape(error) for error in record.errors)
        table.add_row(record.name, record.distribution or "-", record.version or "-",
                      provides or "-", status)
    console.print(table)

    table = Table(title="Implementations", title_justify="left")
    for column in ("kind", "name", "plugin", "priority", "available"):
        table.add_column(column)
    for impl in implementations:
        state = availability[(impl.kind, impl.name)]
        shown = "[green]yes[/green]" if state else f"[yellow]no[/yellow]: {escape(state.reason)}"
        table.add_row(impl.kind, impl.name, impl.plugin, str(impl.priority), shown)
    console.print(table)
