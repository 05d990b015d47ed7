"""``enigma train`` and ``enigma train-tokenizer``: training on the kernel's trainer kind."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

TRAIN_EXAMPLES = """
\b
Examples:
  enigma train --data notes/ --model ./my-llama --out ./my-llama-notes
  enigma train --data chats.jsonl --model ./my-llama --out ./tuned --epochs 3 --lr 2e-5
  enigma train --data 'corpus/*.txt' --model config.json --tokenizer ./tok --out ./scratch --max-steps 2000
  enigma train --config train.toml --resume
  enigma train --data corpus/ --model ./my-llama --out ./tuned --nproc 2 --zero 2
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:29500 -m enigma_cli train ... --zero 2
"""


@click.command(epilog=TRAIN_EXAMPLES, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A TOML file of these options (flags given here win).")
@click.option("--data", multiple=True, help="Training files, folders or globs (repeatable).")
@click.option("--model", help="A model folder to fine-tune, or a config.json to train from scratch.")
@click.option("--out", help="Folder for checkpoints and the final model.")
@click.option("--tokenizer", help="Folder with tokenizer.json (default: the model's).")
@click.option("--method", "--trainer", "trainer",
              help="Training method: a trainer implementation (default sft; `enigma plugins` lists them). "
                   "Options of its own follow as --<option> VALUE (e.g. --lora-rank 8).")
@click.option("--format", "data_format", metavar="FORMAT",
              help="Record format: auto (detected per record), text, alpaca, messages, or one the training "
                   "method reads (e.g. a preference format) [auto].")
@click.option("--seq-len", type=int, help="Tokens per training sequence [512].")
@click.option("--batch-size", type=int, help="Sequences per micro-batch [8].")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step [1].")
@click.option("--epochs", type=float, help="Passes over the data [1].")
@click.option("--max-steps", type=int, help="Optimizer steps in all (overrides --epochs).")
@click.option("--lr", type=float, help="Peak learning rate [3e-4].")
@click.option("--warmup-steps", type=int, help="Linear warmup steps before cosine decay [0].")
@click.option("--weight-decay", type=float, help="AdamW weight decay [0.1].")
@click.option("--grad-clip", type=float, help="Clip the gradient norm to this [1.0].")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), help="Compute dtype (bf16 autocast) [fp32].")
@click.option("--gradient-checkpointing", help="Recompute activations of layers: all, none, or 0,2,4-7.")
@click.option("--packing/--no-packing", default=None, help="Pack short samples into full sequences [on].")
@click.option("--streaming", is_flag=True, default=None, help="Read the data lazily (needs --max-steps).")
@click.option("--val-fraction", type=float, help="Share of blocks held out for validation [0.05].")
@click.option("--eval-interval", type=int, help="Steps between validation runs [200].")
@click.option("--save-interval", type=int, help="Steps between checkpoints [200].")
@click.option("--seed", type=int, help="Seed for initialization and data order [0].")
@click.option("--threads", type=int, help="CPU threads for torch.")
@click.option("--nproc", type=int, help="Ranks to start on this machine (data parallel; enigma-plugin-zero) [1].")
@click.option("--zero", type=click.IntRange(0, 2),
              help="ZeRO stage across ranks: 0 replicated, 1 optimizer state sharded, 2 and gradients sharded [0].")
@click.option("--save-dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), help="dtype of saved weights.")
@click.option("--resume", is_flag=True, default=None, help="Continue the run in --out from its last checkpoint.")
def train(ctx: click.Context, config_file: Path | None, data: tuple[str, ...], data_format: str | None,
          **options: Any) -> None:
    """Fine-tune a model, or pre-train one from a config, on your data.

    Data may be plain text, JSONL with a text field, Alpaca records
    (instruction/input/output) or chats (messages, or ShareGPT conversations);
    chats are rendered with the model's chat template and trained on the
    assistant turns only. The result is a Hugging Face folder in --out.
    """
    from enigma.training import load_train_config
    from enigma.training import train as run_training

    config = load_train_config(config_file, data=list(data) or None, format=data_format, **options)
    method_options = method_flags(ctx.args)
    if method_options:
        import attrs

        config = attrs.evolve(config, options={**config.options, **method_options})
    reporter = ProgressReporter()
    try:
        with reporter:
            out = run_training(config, progress=reporter)
    except KeyboardInterrupt:
        from enigma.training.checkpoint import latest_checkpoint

        checkpoint = latest_checkpoint(Path(config.out).expanduser())
        where = f"the last checkpoint is {checkpoint}; continue with --resume" if checkpoint else "no checkpoint yet"
        click.echo(f"Interrupted: {where}", err=True)
        raise SystemExit(130) from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun, the main rank saves and says so
        click.echo(f"Model saved to {out}")


def method_flags(args: list[str]) -> dict[str, str | bool]:
    """``--lora-rank 8 --use-dora`` -> ``{"lora_rank": "8", "use_dora": True}``: the flags the training
    method takes beyond enigma train's own (checked against its options class when it starts)."""
    options: dict[str, str | bool] = {}
    index = 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("--") or arg == "--":
            raise click.UsageError(f"unexpected argument {arg!r}; training options are --<option> VALUE")
        name, equals, value = arg[2:].partition("=")
        if not equals:
            if index + 1 < len(args) and not args[index + 1].startswith("--"):
                value, index = args[index + 1], index + 1
            else:
                value = True
        options[name.replace("-", "_")] = value
        index += 1
    return options


class ProgressReporter:
    """Draws a trainer's reports: a live bar on a terminal, plain lines otherwise."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.progress: Any = None
        self.task: Any = None

    def __enter__(self) -> ProgressReporter:
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                                     console=self.console)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def __call__(self, event: Any) -> None:
        if event.event == "start":
            if self.progress is not None:
                self.task = self.progress.add_task("train", total=event.total_steps, completed=event.step, stats="")
            self._line(f"{event.message or 'starting'}; {event.total_steps} steps")
        elif event.event == "step":
            stats = f"loss {event.loss:.4f}  lr {event.lr:.2e}  {event.tokens_per_s:,.0f} tok/s"
            stats += "".join(f"  {name} {value:.4f}" for name, value in event.metrics.items())
            if self.progress is not None:
                self.progress.update(self.task, completed=event.step, stats=stats)
            else:
                self._line(f"step {event.step}/{event.total_steps}  {stats}  eta {event.eta_s:,.0f}s")
        elif event.event == "eval":
            self._line(f"step {event.step}: validation loss {event.val_loss:.4f}, "
                       f"perplexity {event.val_perplexity:.2f}")
        elif event.event == "save":
            self._line(f"step {event.step}: checkpoint {event.path}")

    def _line(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            self.console.print(text, highlight=False, soft_wrap=True)


@click.command("train-tokenizer", epilog="""
\b
Examples:
  enigma train-tokenizer --data corpus/ --vocab-size 8192 --out ./tok
""")
@click.option("--data", multiple=True, required=True, help="Corpus files, folders or globs (repeatable).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--vocab-size", type=int, default=8192, show_default=True)
@click.option("--min-frequency", type=int, default=2, show_default=True, help="Merge pairs seen at least this often.")
def train_tokenizer(data: tuple[str, ...], out: Path, vocab_size: int, min_frequency: int) -> None:
    """Train a byte-level BPE tokenizer (with a ChatML chat template) on a corpus."""
    from enigma.training.tokenizer import train_tokenizer as run

    folder = run(list(data), out, vocab_size=vocab_size, min_frequency=min_frequency)
    click.echo(f"Tokenizer saved to {folder}")
