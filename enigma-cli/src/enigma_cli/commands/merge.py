"""``enigma merge``: mergekit's YAML, or models named on the command line, merged tensor by tensor."""

from __future__ import annotations

import click

from enigma_cli.progress import ProgressBar

EXAMPLES = """
\b
Examples:
  enigma merge -c merge.yml --out ./merged          a mergekit config, as mergekit-yaml runs it
  enigma merge -c merge.yml --name blend:v1         the result into the store
  enigma merge ./a ./b --method slerp --set t=0.3 --out ./ab
  enigma merge base ./math ./code --method ties --base base --weights 1,0.5,0.5 --set density=0.5 --out ./tied
  enigma merge --list                               the merge methods
"""


def _parse_value(text: str) -> object:
    import yaml

    return yaml.safe_load(text)


@click.command(epilog=EXAMPLES)
@click.argument("models", nargs=-1)
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              help="A mergekit YAML config (merge_method, models: or slices:, parameters...).")
@click.option("--method", help="The merge method when MODELS are given [linear].")
@click.option("--weights", help="Comma-separated weight per model, in order.")
@click.option("--base", help="The base model (slerp, task_arithmetic, ties, dare_*).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="A global parameter (t=0.5, density=0.5, normalize=false); repeatable.")
@click.option("--out", "output", type=click.Path(file_okay=False), help="Write the merged model to this new folder.")
@click.option("--name", help="Put the merged model into the store under this name.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of DARE's and DELLA's random drops.")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Split the weights into safetensors shards of at most this size (e.g. 2GB, 500MB).")
@click.option("--list", "list_methods", is_flag=True, help="List the merge methods.")
def merge(models: tuple[str, ...], config_path: str | None, method: str | None, weights: str | None,
          base: str | None, settings: tuple[str, ...], output: str | None, name: str | None, seed: int,
          max_shard_size: str, list_methods: bool) -> None:
    """Merge models: a mergekit YAML (-c), or MODELS with --method."""
    from enigma.merging import METHODS, MergeConfig, merge_models
    from enigma.merging import merge as run_merge

    if list_methods:
        width = max(len(n) for n in METHODS)
        for method_name, found in METHODS.items():
            click.echo(f"{method_name:<{width}}  {found.description}")
        return
    if (config_path is None) == (not models):
        raise click.UsageError("give either -c CONFIG or the MODELS to merge")
    if config_path and (method or weights or base or settings):
        raise click.UsageError("--method, --weights, --base and --set go with MODELS; a -c config says them")
    if (output is None) == (name is None):
        raise click.UsageError("give exactly one of --out (a new folder) and --name (a store name)")
    shard_bytes = _parse_size(max_shard_size)
    with ProgressBar("merging") as bar:
        if config_path:
            folder = run_merge(MergeConfig.from_yaml(config_path), output=output, name=name, seed=seed,
                               max_shard_bytes=shard_bytes, progress=bar.update)
        else:
            parameters = {}
            for setting in settings:
                key, sep, value = setting.partition("=")
                if not sep or not key:
                    raise click.BadParameter(f"{setting!r} is not KEY=VALUE", param_hint="--set")
                parameters[key] = _parse_value(value)
            weight_list = None
            if weights:
                try:
                    weight_list = [float(w) for w in weights.split(",")]
                except ValueError:
                    raise click.BadParameter(f"{weights!r} is not comma-separated numbers",
                                             param_hint="--weights") from None
            folder = merge_models(list(models), weights=weight_list, method=method or "linear", base=base,
                                  output=output, name=name, seed=seed, max_shard_bytes=shard_bytes,
                                  progress=bar.update, **parameters)
    click.echo(f"wrote {folder}")


def _parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    stripped = text.strip().upper()
    number = stripped.rstrip("KMGIB")
    try:
        return int(float(number) * units[stripped[len(number):]])
    except (KeyError, ValueError):
        raise click.BadParameter(f"{text!r} is not a size like 5GB or 500MB", param_hint="--max-shard-size") from None

