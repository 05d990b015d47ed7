"""enigma-plugin-lora's hooks: the ``lora`` trainer and the ``enigma merge-adapter`` command."""

from __future__ import annotations

from enigma import hookimpl


@hookimpl
def enigma_register_trainers(register):
    from enigma_lora.options import LoRAOptions

    register("lora", "enigma_lora.trainer:LoRATrainer", options=LoRAOptions,
             summary="LoRA fine-tuning: low-rank adapters on a frozen base, saved in PEFT's format")


@hookimpl
def enigma_commands(cli):
    import click

    @cli.command("merge-adapter")
    @click.argument("base")
    @click.argument("adapter", type=click.Path(exists=True, file_okay=False))
    @click.option("--name", help="Put the merged model into the store under this name.")
    @click.option("--out", "output", type=click.Path(file_okay=False), help="Write it to this new folder.")
    def merge_adapter_command(base: str, adapter: str, name: str | None, output: str | None) -> None:
        """Merge a LoRA ADAPTER (PEFT's format) into BASE: a plain model with the update in its weights."""
        from enigma_lora.adapter import merge_adapter

        if (name is None) == (output is None):
            raise click.UsageError("give exactly one of --name (the store) and --out (a new folder)")
        click.echo(f"wrote {merge_adapter(base, adapter, output=output, name=name)}")


@hookimpl
def enigma_transform_model(model, context):
    """``LLM(base, adapters={name: folder})`` (or ``enable_lora=True``): wrap the Linears adapters may adapt,
    before the weights load."""
    folders = context.options.get("lora_adapters")
    if folders is None:
        return
    from enigma_lora.serving import wrap_for_serving

    wrap_for_serving(model, folders, max_loras=int(context.options.get("max_loras", 4)), device=context.device,
                     dtype=context.dtype, all_linear=bool(context.options.get("lora_all_linear")))
