"""Training data: files in, fixed-length token blocks out.

Sources are plain text files (``.txt``, ``.md``, ``.rst``; one document per
file), JSON Lines (``.jsonl``) and JSON arrays (``.json``). A record is one of:

- ``{"text": ...}`` — plain text, the loss on every token;
- Alpaca: ``{"instruction", "input" (optional), "output", "system" (optional)}``;
- chat: ``{"messages": [{"role", "content"}, ...]}`` (OpenAI) or
  ``{"conversations": [{"from", "value"}, ...]}`` (ShareGPT).

Alpaca and chat records are rendered through the model's chat template, with
the loss on assistant turns only. Examples are packed back to back into blocks
of ``seq_len + 1`` tokens (inputs are a block's first ``seq_len`` tokens,
targets its last ``seq_len``), or padded one per block without packing.

:class:`TokenBlocks` holds everything in memory, split into training and
validation blocks; :class:`StreamingBlocks` reads the files lazily for corpora
larger than memory. Both give the same batches for the same seed and position,
so a resumed run sees exactly the data it would have seen.
"""

from __future__ import annotations

import glob
import json
import random
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from enigma.errors import BadRequestError, NotFoundError

IGNORE_INDEX = -100
"""Label of a token that carries no loss (prompt turns, padding)."""
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSON_SUFFIXES = (".jsonl", ".json")
FORMATS = ("auto", "text", "alpaca", "messages")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function_call": "assistant", "observation": "tool"}


class DatasetError(BadRequestError):
    """A data file or record is malformed; the message names file, line and field."""


@attrs.frozen
class Record:
    """One training example as read from a file, before tokenization."""

    source: str
    line: int
    data: str | dict[str, Any]


@attrs.frozen
class Example:
    """One tokenized example: ids and per-token labels (``IGNORE_INDEX`` = no loss)."""

    input_ids: list[int]
    labels: list[int]


def expand_sources(patterns: Sequence[str | Path]) -> list[Path]:
    """Files named by paths, directories (searched recursively) and globs, in a stable order."""
    files: list[Path] = []
    for pattern in patterns:
        text = str(pattern)
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + JSON_SUFFIXES)
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not found:
            raise NotFoundError(f"training data {text!r} matches no file; pass a file, a folder or a glob "
                                f"of {', '.join(TEXT_SUFFIXES + JSON_SUFFIXES)} files")
        files.extend(found)
    return list(dict.fromkeys(files))


def read_records(files: Sequence[Path]) -> Iterator[Record]:
    """Every record of every file, lazily, in order."""
    for path in files:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        yield Record(str(path), number, _parse_json(line, path, number))
        elif path.suffix == ".json":
            data = _parse_json(path.read_text(encoding="utf-8"), path, 1)
            items = data if isinstance(data, list) else [data]
            for number, item in enumerate(items, 1):
                yield Record(f"{path} item", number, item)
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(f"{path}: not UTF-8 text ({exc}); convert it to UTF-8") from exc
            if text.strip():
                yield Record(str(path), 1, text)


def _parse_json(text: str, path: Path, line: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}:{line}: invalid JSON ({exc.msg} at column {exc.colno}); "
                           "each line of a .jsonl file must be one JSON object") from exc


def detect_format(record: Record) -> str:
    """``text``, ``alpaca`` or ``messages`` for one record."""
    data = record.data
    if isinstance(data, str):
        return "text"
    if not isinstance(data, dict):
        raise DatasetError(f"{record.source}:{record.line}: a record must be a JSON object, "
                           f"not {type(data).__name__}")
    if "messages" in data or "conversations" in data:
        return "messages"
    if "instruction" in data or "output" in data:
        return "alpaca"
    if "text" in data:
        return "text"
    raise DatasetError(f"{record.source}:{record.line}: record has none of the fields 'text', "
                       "'instruction'/'output' (Alpaca), 'messages' or 'conversations' (fields: "
                       f"{', '.join(sorted(data)) or 'none'})")


def _field(record: Record, name: str, *, required: bool = True) -> str:
    data = record.data
    assert isinstance(data, dict)
    if name not in data:
        if required:
            raise DatasetError(f"{record.source}:{record.line}: missing field {name!r}")
        return ""
    value = data[name]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DatasetError(f"{record.source}:{record.line}: field {name!r} must be a string, "
                           f"not {type(value).__name__}")
    return value


def record_messages(record: Record) -> list[dict[str, str]]:
    """The conversation of an Alpaca or chat record, as OpenAI-style messages."""
    data = record.data
    assert isinstance(data, dict)
    where = f"{record.source}:{record.line}"
    if "instruction" in data or "output" in data:
        instruction, extra = _field(record, "instruction"), _field(record, "input", required=False)
        system = _field(record, "system", required=False)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "system", "content": system}] if system else []
        return [*messages, {"role": "user", "content": prompt},
                {"role": "assistant", "content": _field(record, "output")}]
    key = "messages" if "messages" in data else "conversations"
    turns = data[key]
    if not isinstance(turns, list) or not turns:
        raise DatasetError(f"{where}: field {key!r} must be a non-empty list of turns")
    messages = []
    for index, turn in enumerate(turns):
        field = f"{key}[{index}]"
        if not isinstance(turn, dict):
            raise DatasetError(f"{where}: field {field} must be an object")
        role_key, content_key = ("role", "content") if key == "messages" else ("from", "value")
        role, content = turn.get(role_key), turn.get(content_key)
        if key == "conversations":
            if role not in SHAREGPT_ROLES:
                raise DatasetError(f"{where}: field {field}.from is {role!r}; expected one of "
                                   f"{', '.join(sorted(SHAREGPT_ROLES))}")
            role = SHAREGPT_ROLES[role]
        if role not in ("system", "user", "assistant", "tool"):
            raise DatasetError(f"{where}: field {field}.{role_key} is {role!r}; expected system, user, "
                               "assistant or tool")
        if not isinstance(content, str):
            raise DatasetError(f"{where}: field {field}.{content_key} must be a string, "
                               f"not {type(content).__name__}")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{where}: field {key!r} has no assistant turn, so nothing to learn from")
    return messages


class ExampleEncoder:
    """Turns records into :class:`Example` s with one tokenizer."""

    def __init__(self, tokenizer: Any, *, format: str = "auto") -> None:
        if format not in FORMATS:
            raise BadRequestError(f"data format {format!r} is not supported; choose {', '.join(FORMATS)}")
        self.tokenizer = tokenizer
        self.format = format
        eos = tokenizer.eos_token_ids
        self.eos_id = eos[0] if eos else None

    def encode(self, record: Record) -> Example:
        kind = detect_format(record) if self.format == "auto" else self.format
        if kind == "text":
            text = record.data if isinstance(record.data, str) else _field(record, "text")
            ids = self.tokenizer.encode(text)
            if self.eos_id is not None:
                ids.append(self.eos_id)
            return Example(ids, list(ids))
        if isinstance(record.data, str):
            raise DatasetError(f"{record.source}: plain text cannot be read as {kind!r} data; "
                               "use JSON Lines records or --format text")
        return self.encode_conversation(record_messages(record), where=f"{record.source}:{record.line}")

    def encode_conversation(self, messages: list[dict[str, str]], *, where: str = "conversation") -> Example:
        """Render through the chat template; labels only on assistant turns.

        The template is rendered at each assistant turn's boundaries, so the
        turn's text (and its end-of-turn token) is exactly what the model
        would generate after the prompt.
        """
        render = self.tokenizer.apply_chat_template
        pieces: list[tuple[str, bool]] = []
        done = ""
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = render(messages[:index], add_generation_prompt=True)
            full = render(messages[: index + 1], add_generation_prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise DatasetError(f"{where}: the chat template does not render conversations "
                                   "incrementally, so assistant turns cannot be masked; use a template "
                                   "whose output for a conversation begins with its output for every prefix")
            pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        rest = render(messages, add_generation_prompt=False)[len(done):]
        pieces.append((rest, False))
        ids: list[int] = []
        labels: list[int] = []
        for text, trained in pieces:
            if not text:
                continue
            piece = self.tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        return Example(ids, labels)


def pack(examples: Iterator[Example], block_len: int) -> Iterator[tuple[list[int], list[int]]]:
    """Examples back to back, cut into blocks of ``block_len`` tokens.

    Consecutive blocks overlap by one token, so every token but the very first
    is a target exactly once. The final partial block is dropped.
    """
    ids: list[int] = []
    labels: list[int] = []
    for example in examples:
        ids += example.input_ids
        labels += example.labels
        while len(ids) >= block_len:
            yield ids[:block_len], labels[:block_len]
            ids, labels = ids[block_len - 1:], labels[block_len - 1:]


def pad(examples: Iterator[Example], block_len: int, pad_id: int) -> Iterator[tuple[list[int], list[int]]]:
    """One example per block: truncated to ``block_len``, or padded (with no loss)."""
    for example in examples:
        ids, labels = example.input_ids[:block_len], example.labels[:block_len]
        missing = block_len - len(ids)
        yield ids + [pad_id] * missing, labels + [IGNORE_INDEX] * missing


def _is_validation(index: int, fraction: float) -> bool:
    return fraction > 0 and zlib.crc32(index.to_bytes(8, "little")) % 10_000 < fraction * 10_000


@attrs.define
class DataOptions:
    """How files become blocks."""

    seq_len: int = 512
    packing: bool = True
    format: str = "auto"
    val_fraction: float = 0.05


class _Blocks:
    def __init__(self, files: Sequence[Path], tokenizer: Any, options: DataOptions) -> None:
        self.files = list(files)
        self.options = options
        self.encoder = ExampleEncoder(tokenizer, format=options.format)
        self.pad_id = self.encoder.eos_id if self.encoder.eos_id is not None else 0

    def _all_blocks(self) -> Iterator[tuple[int, tuple[list[int], list[int]]]]:
        examples = (self.encoder.encode(record) for record in read_records(self.files))
        block_len = self.options.seq_len + 1
        blocks = pack(examples, block_len) if self.options.packing else pad(examples, block_len, self.pad_id)
        return enumerate(blocks)


class TokenBlocks(_Blocks):
    """Every block in memory; a fixed pseudo-random share of blocks (by a hash of
    each block's index) is held out for validation."""

    def __init__(self, files: Sequence[Path], tokenizer: Any, options: DataOptions) -> None:
        super().__init__(files, tokenizer, options)
        train, val = [], []
        for index, block in self._all_blocks():
            (val if _is_validation(index, options.val_fraction) else train).append(block)
        if not train:
            raise DatasetError(f"the training data ({len(self.files)} file(s)) gives no full block of "
                               f"{options.seq_len + 1} tokens; add data or lower --seq-len")
        self.train = _stack(train)
        self.val = _stack(val) if val else None

    @property
    def num_train_blocks(self) -> int:
        return self.train[0].shape[0]

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.num_train_blocks // batch_size

    def train_batches(self, batch_size: int, *, seed: int, start: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches in a seeded random order, epoch after epoch, from batch number ``start``."""
        per_epoch = self.batches_per_epoch(batch_size)
        if per_epoch == 0:
            raise DatasetError(f"the training data has {self.num_train_blocks} blocks, fewer than one batch "
                               f"of {batch_size}; add data or lower --batch-size")
        position = start
        while True:
            epoch, index = divmod(position, per_epoch)
            generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
            order = torch.randperm(self.num_train_blocks, generator=generator)
            chosen = order[index * batch_size:(index + 1) * batch_size]
            yield self.train[0][chosen], self.train[1][chosen]
            position += 1

    def val_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.val is None:
            return
        for start in range(0, self.val[0].shape[0], batch_size):
            yield self.val[0][start:start + batch_size], self.val[1][start:start + batch_size]


class StreamingBlocks(_Blocks):
    """Blocks read lazily from the files, shuffled within a seeded buffer."""

    def __init__(self, files: Sequence[Path], tokenizer: Any, options: DataOptions, *,
                 shuffle_buffer: int = 1024) -> None:
        super().__init__(files, tokenizer, options)
        self.shuffle_buffer = shuffle_buffer

    def _epoch(self, seed: int, epoch: int, *, validation: bool) -> Iterator[tuple[list[int], list[int]]]:
        fraction = self.options.val_fraction
        blocks = (block for index, block in self._all_blocks() if _is_validation(index, fraction) == validation)
        if validation:
            yield from blocks
            return
        rng = random.Random(seed * 100_003 + epoch)
        buffer: list[tuple[list[int], list[int]]] = []
        for block in blocks:
            buffer.append(block)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def train_batches(self, batch_size: int, *, seed: int, start: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches epoch after epoch; resuming at ``start`` re-reads and skips the batches before it."""
        position = 0
        epoch = 0
        while True:
            batch: list[tuple[list[int], list[int]]] = []
            produced = False
            for block in self._epoch(seed, epoch, validation=False):
                batch.append(block)
                if len(batch) == batch_size:
                    produced = True
                    if position >= start:
                        yield _stack(batch)
                    position += 1
                    batch = []
            if not produced:
                raise DatasetError(f"the training data gives fewer than {batch_size} blocks of "
                                   f"{self.options.seq_len + 1} tokens; add data or lower --batch-size/--seq-len")
            epoch += 1

    def val_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        batch = []
        for block in self._epoch(0, 0, validation=True):
            batch.append(block)
            if len(batch) == batch_size:
                yield _stack(batch)
                batch = []
        if batch:
            yield _stack(batch)


def _stack(blocks: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([ids for ids, _ in blocks], dtype=torch.long)
    labels = torch.tensor([labels for _, labels in blocks], dtype=torch.long)
    return ids, labels


def load_blocks(data: Sequence[str | Path], tokenizer: Any, options: DataOptions, *,
                streaming: bool = False, shuffle_buffer: int = 1024) -> TokenBlocks | StreamingBlocks:
    """The blocks of the files that ``data`` names (paths, folders, globs)."""
    files = expand_sources(data)
    if streaming:
        return StreamingBlocks(files, tokenizer, options, shuffle_buffer=shuffle_buffer)
    return TokenBlocks(files, tokenizer, options)
