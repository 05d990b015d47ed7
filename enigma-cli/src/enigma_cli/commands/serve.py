"""``enigma serve``: the HTTP API (OpenAI-compatible and whatever transports are installed)."""

from __future__ import annotations

import logging

import click

from enigma_cli.commands.engine_flags import engine_flags, speculative_flags, speculative_options


@click.command(epilog="""
\b
Examples:
  enigma serve                                  the default model on 127.0.0.1:11500
  enigma serve enigma-tiny qwen:0.5b --port 8000
  ENIGMA_SERVER__HOST=0.0.0.0 enigma serve mine:v1
  enigma serve ./base --lora sql=./sql-adapter --lora chat=./chat-adapter

\b
Then, with the openai SDK:
  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:11500/v1", api_key="unused")
  client.chat.completions.create(model="enigma-tiny", messages=[{"role": "user", "content": "Hi"}])
""")
@click.argument("models", nargs=-1)
@click.option("--host", help="Address to listen on [config server.host: 127.0.0.1].")
@click.option("--port", type=int, help="Port to listen on [config server.port: 11500].")
@click.option("--max-body-mb", type=float, default=4.0, show_default=True, help="Largest request body accepted.")
@click.option("--no-auth", is_flag=True, help="Serve without API keys even if some exist (local use).")
@click.option("--graceful-timeout", type=float, default=30.0, show_default=True,
              help="Seconds in-flight requests get to finish on shutdown (Ctrl-C, SIGTERM).")
@click.option("--lora", "loras", multiple=True, metavar="NAME=PATH",
              help="Serve a LoRA adapter (PEFT's format) on the first model as the model NAME; repeatable. "
                   "Requests of several adapters share one batch (needs enigma-plugin-lora).")
@click.option("--max-loras", type=click.IntRange(min=1), default=4, show_default=True,
              help="Adapters held in memory at once (the least recently used is dropped, read again on use).")
@click.option("--tool-parser", type=click.Choice(["hermes", "llama3_json", "mistral"]), default=None,
              help="How the models write tool calls [default: as each model's chat template asks; hermes "
                   "when it does not say].")
@click.option("--tensor-parallel", "tensor_parallel", type=click.IntRange(min=1), default=1, show_default=True,
              metavar="N", help="Split the first model's layers over N processes (enigma-plugin-zero): each holds "
                                "1/N of the weights and of the KV cache.")
@speculative_flags
@engine_flags
def serve(models: tuple[str, ...], host: str | None, port: int | None, max_body_mb: float, no_auth: bool,
          graceful_timeout: float, loras: tuple[str, ...], max_loras: int, tool_parser: str | None,
          backend: str | None, scheduler: str | None, cache: str | None, draft: str | None,
          num_speculative_tokens: int | None, tensor_parallel: int) -> None:
    """Serve models over HTTP: the OpenAI API (/v1/...), health routes, and installed transports.

    One process serves every request: its engine batches them continuously,
    so more worker processes would only hold more copies of the weights.
    Requests pick a model by its name in the `model` field. Once an API key
    exists (`enigma keys create`), requests need one unless --no-auth.
    """
    import asyncio

    from enigma.config import load_config
    from enigma.server.context import ServerContext
    from enigma.server.serve import serve_async

    config = load_config()
    names = list(models) or [config.get("models.default")]
    speculative = speculative_options(draft, num_speculative_tokens)
    from enigma.llm import resolve_model_path

    for name in names:  # an unknown name fails now, not after the server is up
        resolve_model_path(name)
    adapters = {}
    for entry in loras:
        adapter_name, sep, path = entry.partition("=")
        if not sep or not adapter_name or not path:
            raise click.BadParameter(f"{entry!r} is not NAME=PATH", param_hint="--lora")
        from pathlib import Path

        if not (Path(path).expanduser() / "adapter_config.json").is_file():
            raise click.BadParameter(f"{path} is not a LoRA adapter folder (no adapter_config.json)",
                                     param_hint="--lora")
        if adapter_name in names or adapter_name in adapters:
            raise click.BadParameter(f"the name {adapter_name!r} is already served", param_hint="--lora")
        adapters[adapter_name] = str(Path(path).expanduser())
    host = host or config.get("server.host")
    port = port or config.get("server.port")
    access = logging.getLogger("enigma.server")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    from enigma.opening import engine_options

    context = ServerContext(names, max_body_bytes=int(max_body_mb * 2**20), auth=not no_auth,
                            rate_limit=config.get("server.rate_limit"),
                            ip_rate_limit=config.get("server.ip_rate_limit"),
                            token_rate_limit=config.get("server.token_rate_limit"),
                            ip_token_rate_limit=config.get("server.ip_token_rate_limit"),
                            llm_options={**engine_options(config, backend=backend, scheduler=scheduler,
                                                          cache=cache), "max_loras": max_loras},
                            adapters=adapters, tool_parser=tool_parser, speculative=speculative,
                            tensor_parallel_size=tensor_parallel)
    served = ", ".join(names + list(adapters))
    click.echo(f"enigma serving {served} on http://{host}:{port} (OpenAI API at /v1)", err=True)
    asyncio.run(serve_async(context, host, port, graceful_timeout=graceful_timeout))
