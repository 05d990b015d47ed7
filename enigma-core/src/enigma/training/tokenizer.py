"""Training a byte-level BPE tokenizer on a corpus (GPT-2 style, with ``tokenizers``).

Byte-level BPE never meets an unknown character: every string is bytes first,
so any text round-trips. The saved folder has tokenizer.json, and
tokenizer_config.json with the special tokens and a chat template (ChatML by
default), ready for ``enigma train --tokenizer``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from enigma.datasets import detect_format, expand_sources, read_records, record_messages
from enigma.errors import BadRequestError
from enigma.fsutil import atomic_write_text

END_OF_TEXT = "<|endoftext|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_SPECIAL_TOKENS = (END_OF_TEXT, "<|im_start|>", "<|im_end|>")


def corpus_texts(data: Sequence[str | Path]) -> Iterator[str]:
    """The text of every record (plain text, or each turn of instruction and chat data)."""
    for record in read_records(expand_sources(data)):
        kind = detect_format(record)
        if kind == "text":
            yield record.data if isinstance(record.data, str) else str(record.data.get("text", ""))
        else:
            for message in record_messages(record):
                yield message["content"]


def train_tokenizer(data: Sequence[str | Path], out: str | Path, *, vocab_size: int = 8192,
                    min_frequency: int = 2, special_tokens: Sequence[str] = CHATML_SPECIAL_TOKENS,
                    chat_template: str | None = CHATML_TEMPLATE, model_max_length: int = 2048) -> Path:
    """Train a byte-level BPE on the files ``data`` names and save it to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    floor = 256 + len(special_tokens)
    if vocab_size < floor:
        raise BadRequestError(f"vocab_size {vocab_size} is too small: a byte-level tokenizer needs at least "
                              f"{floor} (256 bytes and {len(special_tokens)} special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus_texts(data), trainer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tokenizer.json", tokenizer.to_str(pretty=False))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "eos_token": special_tokens[0], "pad_token": special_tokens[0], "add_bos_token": False,
              "clean_up_tokenization_spaces": False}
    if chat_template:
        config["chat_template"] = chat_template
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    return out
