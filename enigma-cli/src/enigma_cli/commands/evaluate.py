"""``enigma eval``: a model's scores on a task, as lm-evaluation-harness computes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

TASKS = ("hellaswag", "arc", "mmlu", "mc", "perplexity", "generate")

EXAMPLES = """
\b
Examples:
  enigma eval mine:v1 --task hellaswag --data hellaswag_val.jsonl --limit 200
  enigma eval ./my-llama --task arc --data arc_easy_test.jsonl --output arc.json
  enigma eval enigma-tiny --task perplexity --data notes.txt --window 512 --stride 256
"""


@click.command(name="eval", epilog=EXAMPLES)
@click.argument("model")
@click.option("--task", type=click.Choice(TASKS), required=True,
              help="hellaswag, arc, mmlu or mc (jsonl of query/choices/label): acc and acc_norm; perplexity: "
                   "text files or jsonl with a text field; generate: jsonl of prompt/reference(s): BLEU, chrF, "
                   "ROUGE, exact match, F1.")
@click.option("--data", "data", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False),
              help="The task's data file (repeatable for perplexity).")
@click.option("--limit", type=int, help="Evaluate only the first N questions.")
@click.option("--num-fewshot", type=click.IntRange(min=0), default=0, show_default=True,
              help="Multiple choice and generate: answered examples ahead of each question, drawn as lm-eval draws "
                   "them (from --fewshot-data, else the data less the question).")
@click.option("--fewshot-data", type=click.Path(exists=True, dir_okay=False),
              help="Where few-shot examples come from (a train split) [the --data file].")
@click.option("--fewshot-seed", type=int, default=1234, show_default=True,
              help="Seed of the few-shot draws (lm-eval's --fewshot_random_seed).")
@click.option("--window", type=int, help="Perplexity: tokens of context per window [the model's, at most 2048].")
@click.option("--stride", type=int, help="Perplexity: tokens between window starts [half the window].")
@click.option("--max-tokens", type=int, default=64, show_default=True, help="Generate: tokens per answer.")
@click.option("--stop", multiple=True, help="Generate: a stop string (repeatable) [a blank line].")
@click.option("--bos/--no-bos", default=True, show_default=True,
              help="Multiple choice: lead each context with the tokenizer's BOS (lm-eval's hf backend does; its "
                   "local-completions backend does not).")
@click.option("--base-url", help="Evaluate MODEL as served at this OpenAI-compatible URL (enigma serve, vLLM) instead "
                                 "of in-process; ENIGMA_API_KEY is sent as its key.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Also write the results as JSON.")
def evaluate(model: str, task: str, data: tuple[str, ...], limit: int | None, num_fewshot: int,
             fewshot_data: str | None, fewshot_seed: int, window: int | None, stride: int | None, max_tokens: int,
             stop: tuple[str, ...], bos: bool, base_url: str | None, output: Path | None) -> None:
    """Score MODEL on a task: in-process through the engine (batched), or at a server with --base-url."""
    import attrs

    from enigma.config import load_config
    from enigma.evaluation import (
        evaluate_generation,
        evaluate_multiple_choice,
        generation,
        multiple_choice,
        perplexity,
        read_generation,
        read_multiple_choice,
    )
    from enigma.opening import engine_options, open_model

    if (num_fewshot or fewshot_data) and task == "perplexity":
        raise click.UsageError("--num-fewshot and --fewshot-data go with multiple-choice and generate tasks")
    if base_url:
        import os

        from enigma.evaluation.remote import RemoteModel

        llm: Any = RemoteModel(base_url, model, api_key=os.environ.get("ENIGMA_API_KEY"))
    else:
        llm = open_model(model, **engine_options(load_config())).llm
    if task == "perplexity":
        result: Any = perplexity(llm, _texts(data), window=window, stride=stride)
        rows = [("perplexity", f"{result.perplexity:.4f}"), ("bits per byte", f"{result.bits_per_byte:.4f}"),
                ("tokens", str(result.tokens)), ("bytes", str(result.bytes))]
        values = attrs.asdict(result)
    elif task == "generate":
        if len(data) != 1:
            raise click.UsageError("--task generate takes one --data file")
        examples = read_generation(data[0])
        if num_fewshot:
            pool = read_generation(fewshot_data) if fewshot_data else examples
            examples = generation.with_fewshot(examples[:limit], num_fewshot, pool=pool,
                                               same_split=not fewshot_data, seed=fewshot_seed)
        result = evaluate_generation(llm, examples[:limit], max_tokens=max_tokens, stop=stop or ("\n\n",))
        rows = [(name, f"{value:.4f}") for name, value in result.metrics.items()] + [("examples", str(result.count))]
        values = {"count": result.count, **result.metrics, "samples": result.records()}
    else:
        if len(data) != 1:
            raise click.UsageError(f"--task {task} takes one --data file")
        questions = read_multiple_choice(data[0], task)
        if num_fewshot:
            pool = read_multiple_choice(fewshot_data, task) if fewshot_data else questions
            questions = multiple_choice.with_fewshot(questions[:limit], num_fewshot, pool=pool,
                                                     same_split=not fewshot_data, seed=fewshot_seed)
        result = evaluate_multiple_choice(llm, questions[:limit], task=task, add_special_tokens=bos)
        rows = [("acc", f"{result.acc:.4f}"), ("acc_norm", f"{result.acc_norm:.4f}"),
                ("questions", str(result.count))]
        values = {"count": result.count, "acc": result.acc, "acc_norm": result.acc_norm,
                  "num_fewshot": num_fewshot, "samples": result.records()}
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model} · {task}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
    if output is not None:
        from enigma.fsutil import atomic_write_text

        atomic_write_text(output, json.dumps({"model": model, "task": task, **values}, indent=2) + "\n")


def _texts(paths: tuple[str, ...]) -> list[str]:
    texts = []
    for name in paths:
        path = Path(name)
        if path.suffix == ".jsonl":
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record.get("text"), str):
                        raise click.BadParameter(f"{path}, line {number}: no string field 'text'", param_hint="--data")
                    texts.append(record["text"])
        else:
            texts.append(path.read_text(encoding="utf-8"))
    return texts
