"""``enigma quantize``: a model into a quantized artifact, through the installed quantizers."""

from __future__ import annotations

import click

from enigma_cli.progress import ProgressBar

BITS = {4: "Q4_K_M", 5: "Q5_K_M", 6: "Q6_K", 8: "Q8_0"}
"""``--bits`` shorthand: llama.cpp's recommended type for each width."""

EXAMPLES = """
\b
Examples:
  enigma quantize --list                       the types the installed quantizers make
  enigma quantize llama3:8b --type Q4_K_M      into the store as llama3:q4_k_m
  enigma quantize ./my-llama --bits 4 --name mine:q4
  enigma quantize ./my-llama --type INT8 --output ./my-llama-int8
  enigma quantize ./my-llama --type Q5_K_M --output my-llama.Q5_K_M.gguf    one GGUF file, for llama.cpp
  enigma quantize ./model.Q8_0.gguf --type Q4_K_M      requantize a GGUF (quality compounds: a warning says so)
  enigma quantize ./my-llama --type exl2 --bpw 4.0 --calibration texts.jsonl    EXL2 (enigma-plugin-exl2)
"""


@click.command(epilog=EXAMPLES)
@click.argument("model", required=False)
@click.option("--type", "type_name", help="Quantization type (see --list); QUANTIZER:TYPE when two make it.")
@click.option("--bits", type=click.Choice(["4", "5", "6", "8"]), help="Shorthand: 4 Q4_K_M, 5 Q5_K_M, 6 Q6_K, 8 Q8_0.")
@click.option("--name", help="Store name for the result [<model>:<type>].")
@click.option("--output", type=click.Path(), help="Write a folder (or one FILE.gguf) here instead of the store.")
@click.option("--bpw", type=float, help="EXL2: target bits per weight of the decoder layers (2.5-8.0) [4.0].")
@click.option("--head-bits", type=int, help="EXL2: bits of the output head (2-8, or 16 for float16) [6].")
@click.option("--calibration", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Calibration text for quantizers that calibrate (.txt, or .jsonl with a text field); repeatable.")
@click.option("--list", "list_types", is_flag=True, help="List the types the installed quantizers make.")
def quantize(model: str | None, type_name: str | None, bits: str | None, name: str | None, output: str | None,
             bpw: float | None, head_bits: int | None, calibration: tuple[str, ...], list_types: bool) -> None:
    """Quantize MODEL (a store name, packaged model, folder or GGUF file) to fewer bits per weight."""
    from enigma.quantize import SUGGESTED_PLUGINS, installed_types
    from enigma.quantize import quantize as run_quantize

    if list_types:
        types = installed_types()
        if not types:
            click.echo("No quantizer is installed. Install one:\n  " + "\n  ".join(SUGGESTED_PLUGINS))
            return
        width = max(len(t.name) for t in types)
        for t in types:
            click.echo(f"{t.name:<{width}}  {t.quantizer} ({t.origin})  {t.description}")
        return
    if model is None:
        raise click.UsageError("name the MODEL to quantize (or use --list)")
    if (type_name is None) == (bits is None):
        raise click.UsageError("give exactly one of --type and --bits")
    if name is not None and output is not None:
        raise click.UsageError("--name (the store) and --output (a folder or file) exclude each other")
    type_name = type_name or BITS[int(bits)]
    options = {key: value for key, value in (("bpw", bpw), ("head_bits", head_bits),
                                             ("calibration", list(calibration) or None)) if value is not None}
    with ProgressBar("quantizing") as bar:
        folder = run_quantize(model, type_name, name=name, output=output, options=options, progress=bar.update)
    click.echo(f"wrote {folder}")

