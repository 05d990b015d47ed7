"""Preference data: ``prompt``/``chosen``/``rejected`` records tokenized as TRL 1.16 tokenizes them.

Records come from JSON Lines or JSON array files, in either of TRL's forms:

- standard: ``{"prompt": str, "chosen": str, "rejected": str}``; the
  tokenizer's EOS text is appended to each completion, and the completion
  starts where the tokens of ``prompt`` and ``prompt + completion`` part;
- conversational: ``prompt`` a list of messages and ``chosen``/``rejected``
  lists of (assistant) messages, rendered with the chat template (the prompt
  with the generation prompt); or ``chosen``/``rejected`` whole conversations
  whose shared leading turns are the prompt.

Records may carry ``ref_chosen_logps`` and ``ref_rejected_logps`` (TRL's
names): the reference model's log-probabilities, computed elsewhere; the
trainer then does not score those pairs. Only completion tokens carry loss. A pair longer than ``max_length`` tokens
is cut at its end; one whose prompt alone fills it is dropped, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from enigma.errors import BadRequestError

logger = logging.getLogger("enigma.dpo")


@attrs.define
class PreferencePair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref_chosen_logps: float | None = None
    ref_rejected_logps: float | None = None


def _common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def tokenize_pair(record: dict[str, Any], tokenizer: Any, *, where: str) -> PreferencePair:
    """One record's prompt and completions as token ids (TRL's ``tokenize_fn``)."""
    for key in ("chosen", "rejected"):
        if key not in record:
            raise BadRequestError(f"{where}: the record has no {key!r}; preference records need prompt, chosen "
                                  "and rejected")
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if _is_conversation(chosen) and _is_conversation(rejected):
        if prompt is None:
            shared = _common_prefix(chosen, rejected)
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not _is_conversation(prompt):
            raise BadRequestError(f"{where}: with conversations as chosen and rejected the prompt must be a list "
                                  "of messages too")

        def encode(messages: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
            return tokenizer.encode(text, add_special_tokens=False)

        prompt_ids = encode(prompt, True)
        with_chosen, with_rejected = encode(prompt + chosen, False), encode(prompt + rejected, False)
    elif all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        eos = tokenizer.special_tokens.get("eos_token") or ""
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = tokenizer.encode(prompt)
        with_chosen, with_rejected = tokenizer.encode(prompt + chosen), tokenizer.encode(prompt + rejected)
    else:
        raise BadRequestError(f"{where}: prompt, chosen and rejected must be strings, or lists of messages "
                              "({'role', 'content'})")
    start = min(_common_prefix(prompt_ids, with_chosen), _common_prefix(prompt_ids, with_rejected))
    pair = PreferencePair(prompt_ids[:start], with_chosen[start:], with_rejected[start:])
    given = [record.get("ref_chosen_logps"), record.get("ref_rejected_logps")]
    if any(v is not None for v in given):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in given):
            raise BadRequestError(f"{where}: give both ref_chosen_logps and ref_rejected_logps as numbers (the "
                                  "reference model's summed log-probabilities of the completions), or neither")
        pair.ref_chosen_logps, pair.ref_rejected_logps = float(given[0]), float(given[1])
    return pair


def read_preferences(files: Sequence[Path], tokenizer: Any, *, max_length: int) -> list[PreferencePair]:
    """Every pair of the files, tokenized; errors name the file and line."""
    from enigma.datasets import read_records

    pairs = []
    for record in read_records(files):
        where = f"{record.source}:{record.line}"
        data = record.data
        if not isinstance(data, dict):
            raise BadRequestError(f"{where}: a preference record is an object with prompt, chosen and rejected")
        if data.get("chosen") == data.get("rejected") and "chosen" in data:
            logger.warning("%s: chosen and rejected are the same; the pair teaches nothing", where)
        pair = tokenize_pair(data, tokenizer, where=where)
        if len(pair.prompt) >= max_length:
            logger.warning("%s: the prompt alone is %d tokens, the limit (--seq-len) is %d; the pair is left out",
                           where, len(pair.prompt), max_length)
            continue
        room = max_length - len(pair.prompt)
        pair.chosen, pair.rejected = pair.chosen[:room], pair.rejected[:room]
        pairs.append(pair)
    if not pairs:
        raise BadRequestError(f"no preference pairs in {', '.join(str(f) for f in files)}")
    return pairs


def collate(pairs: Sequence[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` ``[2n, length]`` (the chosen sequences, then the rejected), right-padded, with the
    completion mask, the completions' lengths and the reference log-probabilities."""
    sequences = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    completions = [len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs]
    prompts = [len(p.prompt) for p in pairs] * 2
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.bool)
    for row, (sequence, prompt, completion) in enumerate(zip(sequences, prompts, completions)):
        input_ids[row, :len(sequence)] = torch.tensor(sequence)
        mask[row, prompt:prompt + completion] = True
    batch = {"input_ids": input_ids, "completion_mask": mask,
             "lengths": torch.tensor(completions, dtype=torch.float32)}
    if all(p.ref_chosen_logps is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref_chosen_logps for p in pairs]
                                          + [p.ref_rejected_logps for p in pairs], dtype=torch.float32)
    return batch


class PreferenceData:
    """Pairs split into training and validation (a fixed share by index), batched in a seeded order."""

    def __init__(self, pairs: list[PreferencePair], *, pad_id: int, val_fraction: float = 0.0) -> None:
        import hashlib

        def held_out(index: int) -> bool:
            digest = hashlib.sha256(str(index).encode()).digest()
            return int.from_bytes(digest[:4], "little") / 2**32 < val_fraction

        self.pad_id = pad_id
        self.pairs = pairs
        self.train = [p for i, p in enumerate(pairs) if not held_out(i)] if len(pairs) > 1 else pairs
        self.val = [p for i, p in enumerate(pairs) if held_out(i)] if len(pairs) > 1 else []

    def batches_per_epoch(self, batch_size: int) -> int:
        return max(1, len(self.train) // batch_size)

    def train_batches(self, batch_size: int, *, seed: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches epoch after epoch in a seeded order; from batch number ``start`` when resuming."""
        per_epoch = self.batches_per_epoch(batch_size)
        size = min(batch_size, len(self.train))
        epoch, index = divmod(start, per_epoch)
        while True:
            order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            for batch in range(index, per_epoch):
                yield collate([self.train[i] for i in order[batch * size:(batch + 1) * size]], self.pad_id)
            epoch, index = epoch + 1, 0

    def val_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        for begin in range(0, len(self.val), batch_size):
            yield collate(self.val[begin:begin + batch_size], self.pad_id)
