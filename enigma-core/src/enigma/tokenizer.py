"""A model folder's tokenizer: tokenizer.json through ``tokenizers``, plus the
special tokens, EOS ids and chat template its config files declare."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from enigma.chat_template import FALLBACK_TEMPLATE, render_chat
from enigma.errors import NotFoundError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                       "mask_token")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


class Tokenizer:
    """Encode, decode and render chats for one model folder."""

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise NotFoundError(f"model folder {folder} has no tokenizer.json; enigma reads tokenizers in "
                                "the Hugging Face 'fast' format (save one with "
                                "AutoTokenizer.from_pretrained(...).save_pretrained(...))")
        self.folder = folder
        self._tokenizer = RustTokenizer.from_file(str(path))
        # Some tokenizer.json files pad or truncate every encoding; enigma
        # batches and truncates by itself, so encodings must be exact.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        generation = _read_json(folder / "generation_config.json")
        model_config = _read_json(folder / "config.json")

        self.special_tokens: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            text = _token_text(config.get(name)) or _token_text(special_map.get(name))
            if text is not None:
                self.special_tokens[name] = text
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.model_max_length = config.get("model_max_length")
        self.chat_template = self._find_chat_template(folder, config)

        eos_ids = _as_id_list(generation.get("eos_token_id")) or _as_id_list(model_config.get("eos_token_id"))
        eos_text = self.special_tokens.get("eos_token")
        if eos_text is not None and self.token_to_id(eos_text) is not None:
            eos_ids.append(self.token_to_id(eos_text))
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_ids))
        bos = self.special_tokens.get("bos_token")
        self.bos_token_id = self.token_to_id(bos) if bos else None
        self.all_special_ids = frozenset(
            token_id for token_id, token in self._tokenizer.get_added_tokens_decoder().items() if token.special)

    @staticmethod
    def _find_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
        template_file = folder / "chat_template.jinja"
        if template_file.exists():
            return template_file.read_text(encoding="utf-8")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: prefer "default"
            named = {item.get("name"): item.get("template") for item in template}
            template = named.get("default") or next(iter(named.values()), None)
        return template

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def backend_json(self) -> str:
        """The tokenizer as Hugging Face's tokenizer.json text (what llguidance reads)."""
        return self._tokenizer.to_str()

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with special tokens as the tokenizer's post-processor adds them."""
        ids = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        if (add_special_tokens and self.add_bos_token and self.bos_token_id is not None
                and (not ids or ids[0] != self.bos_token_id)):
            ids = [self.bos_token_id, *ids]
        return ids

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        """:meth:`encode` of each text (the Rust tokenizer works through the batch on all cores)."""
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        if not (add_special_tokens and self.add_bos_token and self.bos_token_id is not None):
            return [encoding.ids for encoding in encodings]
        return [ids if ids and ids[0] == self.bos_token_id else [self.bos_token_id, *ids]
                for ids in (encoding.ids for encoding in encodings)]

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Where each token of ``text`` (special tokens left out) lies in it: ``(start, end)`` character
        offsets, in order; for cutting text into pieces of a given number of tokens."""
        return [tuple(span) for span in self._tokenizer.encode(text, add_special_tokens=False).offsets]

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                            chat_template: str | None = None, **extra: Any) -> str:
        """The prompt text for a conversation, rendered by the model's template
        (or ``chat_template``, or a plain fallback when the model has none)."""
        template = chat_template or self.chat_template or FALLBACK_TEMPLATE
        return render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                           special_tokens=self.special_tokens, **extra)
