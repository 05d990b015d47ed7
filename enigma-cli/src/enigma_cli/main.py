"""The ``enigma`` command: a click group that plugins extend.

``main()`` loads the plugins, lets each add its subcommands through the
``enigma_commands`` hook, then runs the command line. Errors a user causes
(:class:`enigma.EnigmaError`) print as ``Error: <message>`` and exit 1;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from enigma import EnigmaError
from enigma import __version__ as core_version
from enigma_cli import __version__ as cli_version
from enigma_cli.commands.config import config
from enigma_cli.commands.evaluate import evaluate
from enigma_cli.commands.keys import keys
from enigma_cli.commands.merge import merge
from enigma_cli.commands.models import cp, create, list_models, pull, rm, show
from enigma_cli.commands.plugins import plugins
from enigma_cli.commands.quantize import quantize
from enigma_cli.commands.run import run
from enigma_cli.commands.serve import serve
from enigma_cli.commands.train import train, train_tokenizer


class EnigmaGroup(click.Group):
    """A click group that turns enigma's errors into one clean line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EnigmaError as exc:
            if ctx.params.get("debug"):
                raise
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=EnigmaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    version=core_version,
    prog_name="enigma",
    message=f"%(prog)s %(version)s (enigma-core {core_version}, enigma-cli {cli_version})",
)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """enigma: run, serve, fine-tune, quantize and ground language models.

    \b
    Examples:
      enigma run                     chat with the default model (enigma-tiny)
      enigma run enigma-tiny "What does os.path.join do?"
      enigma pull hf:HuggingFaceTB/SmolLM2-135M-Instruct
      enigma list                    the models in the store
      enigma plugins                 what is installed, and what can run here
      enigma config show             every setting and where it came from
      enigma config set engine.dtype bfloat16
      enigma train --data notes/ --model ./my-llama --out ./tuned
      enigma quantize ./my-llama --type Q4_K_M
      enigma merge -c merge.yml --out ./merged
    """


for command in (run, serve, keys, pull, list_models, show, rm, cp, create, train, train_tokenizer, quantize, merge,
                evaluate, plugins, config):
    cli.add_command(command)


def build_cli() -> click.Group:
    """The root group with every plugin's subcommands added."""
    from enigma.plugins import get_host

    get_host().broadcast("enigma_commands", cli=cli)
    return cli


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.WARNING, format="Warning: %(message)s", stream=sys.stderr)
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        group = build_cli()
    except EnigmaError as exc:
        if debug:
            raise
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    group.main(args=argv, prog_name="enigma")
