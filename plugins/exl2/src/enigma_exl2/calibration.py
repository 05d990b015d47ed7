"""Calibration text: read, tokenized, and cut into rows of equal length.

The quantizer sees the model's activations on these rows. Text comes from
files — plain text, or JSON lines with a ``text`` field — or, by default, from
``calibration.txt`` shipped here: the opening of the CPython 3.11 tutorial
(the Python docs, PSF License), turned into prose by enigma-tiny's corpus
builder. Tokens run on across texts, and the rows are consecutive windows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import attrs
import torch

from enigma.errors import BadRequestError, NotFoundError

DEFAULT_ROWS = 32
DEFAULT_LENGTH = 512
DEFAULT_NAME = "python-docs-tutorial"


@attrs.frozen
class Calibration:
    """Token rows ``[rows, length]`` and where they came from."""

    tokens: torch.Tensor
    dataset: str

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    def fingerprint(self) -> str:
        return hashlib.sha256(self.tokens.numpy().tobytes()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """What ``quantization_config.calibration`` records (exllamav2's keys)."""
        return {"rows": self.rows, "length": self.length, "dataset": self.dataset}


def read_texts(paths: Sequence[str | Path] | None) -> tuple[list[str], str]:
    """The texts of ``paths`` (``.jsonl``: each line's ``text``; anything else: the whole file), or the default
    slice of the Python docs; and a name for them."""
    if not paths:
        text = resources.files(__package__).joinpath("calibration.txt").read_text(encoding="utf-8")
        return [text], DEFAULT_NAME
    texts = []
    for path in map(Path, paths):
        if not path.is_file():
            raise NotFoundError(f"calibration file {path} does not exist; give a text or JSON-lines file")
        if path.suffix.lower() == ".jsonl":
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise BadRequestError(f"{path}:{number} is not JSON ({exc})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise BadRequestError(f'{path}:{number} has no "text" string; calibration JSON lines look '
                                          'like {"text": "..."}')
                texts.append(record["text"])
        else:
            texts.append(path.read_text(encoding="utf-8"))
    return texts, ",".join(Path(p).name for p in paths)


def calibration_rows(tokenizer: Any, texts: Sequence[str], *, rows: int = DEFAULT_ROWS,
                     length: int = DEFAULT_LENGTH, dataset: str = "custom") -> Calibration:
    """``rows`` windows of ``length`` tokens from ``texts``; an error says how many tokens are needed."""
    if rows < 1 or length < 16:
        raise BadRequestError(f"calibration needs at least 1 row of 16 tokens; asked for {rows} x {length}")
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
    needed = rows * length
    if len(ids) < needed:
        raise BadRequestError(f"the calibration text is too short: {len(ids)} tokens, and {rows} rows of "
                              f"{length} need {needed}; give more text (--calibration FILE) or fewer/shorter "
                              "rows (calibration_rows, calibration_length)")
    return Calibration(torch.tensor(ids[:needed], dtype=torch.long).reshape(rows, length), dataset)
