"""Structured output: completions held to a JSON schema, a regular expression, a list of choices or a
grammar, by masking the tokens that could not continue a valid answer (llguidance, as vLLM's
``guidance`` backend does).

:class:`GuidedDecodingParams` is what a request asks for (vLLM's names), checked and compiled when it is
made, so a bad schema or grammar is the request's error before anything runs. Each sequence that asks
gets a :class:`GrammarConstraint`: the sampler masks the batch's logits with :func:`allowed_tokens`, and
the sequence feeds every sampled token to :meth:`~GrammarConstraint.advance`; once the grammar is
complete and nothing may follow, the sequence stops (``finish_reason`` ``stop``).
"""

from __future__ import annotations

import functools
import json
import threading
import weakref
from typing import Any

import attrs

from enigma.errors import BadRequestError

_KINDS = ("json", "regex", "choice", "grammar", "json_object")


def _schema_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise BadRequestError(f"guided json: the schema is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise BadRequestError(f"guided json: the schema must be a JSON object, got {type(value).__name__}")
    return json.dumps(value)


def _choices(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not value or not all(isinstance(c, str) and c for c in value):
        raise BadRequestError(f"guided choice must be a non-empty list of non-empty strings, got {value!r}")
    return tuple(value)


@attrs.frozen(kw_only=True)
class GuidedDecodingParams:
    """One way to hold a completion to a shape (give exactly one): ``json`` (a JSON schema, dict or text),
    ``regex``, ``choice`` (a list of strings), ``grammar`` (Lark, llguidance's dialect, or GBNF/EBNF as
    llama.cpp writes it) or ``json_object`` (any JSON object). vLLM's ``GuidedDecodingParams``."""

    json: str | None = attrs.field(default=None, converter=_schema_text)
    """The JSON schema, as JSON text."""
    regex: str | None = None
    choice: tuple[str, ...] | None = attrs.field(default=None, converter=_choices)
    grammar: str | None = None
    json_object: bool = False

    def __attrs_post_init__(self) -> None:
        given = [kind for kind in _KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise BadRequestError("guided decoding takes exactly one of json, regex, choice, grammar and "
                                  f"json_object; got {', '.join(given) or 'none'}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise BadRequestError(f"guided {name} must be a non-empty string")
        self.grammar_text()  # compiled now: a bad ask is the request's error

    @property
    def kind(self) -> str:
        return next(kind for kind in _KINDS if getattr(self, kind) not in (None, False))

    def grammar_text(self) -> str:
        """The llguidance grammar for this request (compiled and checked once per distinct ask)."""
        return _grammar(self.kind, self.json or self.regex or self.choice or self.grammar or "")


@functools.lru_cache(maxsize=512)
def _grammar(kind: str, value: Any) -> str:
    import llguidance

    if kind == "json":
        text = llguidance.LLMatcher.grammar_from_json_schema(value, defaults={"whitespace_flexible": False})
    elif kind == "json_object":
        text = llguidance.LLMatcher.grammar_from_json_schema(json.dumps({"type": "object"}),
                                                            defaults={"whitespace_flexible": False})
    elif kind == "regex":
        text = llguidance.LLMatcher.grammar_from_regex(value)
    elif kind == "choice":
        text = llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value) + "\n")
    else:
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            lark = any_to_lark(value)
        except Exception as exc:  # the converter's own errors name the rule
            raise BadRequestError(f"guided grammar: {exc}") from None
        text = llguidance.LLMatcher.grammar_from_lark(lark)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text)
    if is_error:
        raise BadRequestError(f"guided {kind.replace('_', ' ')}: {'; '.join(messages).strip()}")
    return text


class GrammarConstraint:
    """One sequence's grammar state: the tokens allowed next, and the tokens so far consumed."""

    def __init__(self, guided: GuidedDecodingParams, tokenizer: Any, eos_token_ids: frozenset[int]) -> None:
        import llguidance

        self._vocab = tokenizer.vocab_size
        self._matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, eos_token_ids), guided.grammar_text(),
                                             log_level=0)
        if self._matcher.is_error():
            raise BadRequestError(f"guided {guided.kind}: {self._matcher.get_error()}")
        self._eos = eos_token_ids

    def advance(self, token_id: int) -> None:
        """Consume a sampled token (one the mask allowed)."""
        if token_id in self._eos and self._matcher.is_accepting():
            return
        self._matcher.consume_token(token_id)

    @property
    def complete(self) -> bool:
        """The grammar is satisfied and allows nothing more: the sequence is done."""
        return self._matcher.is_stopped()


def allowed_tokens(constraints: list[GrammarConstraint], width: int) -> Any:
    """``[len(constraints), width]`` bools: each constraint's next allowed tokens. llguidance writes each
    mask straight into one bitmask tensor (a few microseconds per sequence); it is unpacked in one go."""
    import torch

    vocab = constraints[0]._vocab
    words = (vocab + 31) // 32
    bitmask = torch.zeros((len(constraints), words), dtype=torch.int32)
    pointer, stride = bitmask.data_ptr(), words * 4
    for row, constraint in enumerate(constraints):
        constraint._matcher.unsafe_compute_mask_ptr(pointer + row * stride, stride)
    packed = bitmask.view(torch.uint8)  # little-endian: token 8k+j is bit j of byte k
    bits = ((packed.unsqueeze(-1) >> _bit_shifts()) & 1).flatten(1).bool()
    if width <= bits.shape[1]:
        mask = bits[:, :width].clone()
    else:
        mask = torch.zeros((len(constraints), width), dtype=torch.bool)
        mask[:, :bits.shape[1]] = bits
    mask[:, vocab:] = False
    # complete: an end-of-sequence token may end it (and must, for a grammar with no way on)
    ending = [row for row, (constraint, some) in enumerate(zip(constraints, mask.any(dim=1).tolist()))
              if not some or constraint._matcher.is_accepting()]
    eos = sorted(token for token in constraints[0]._eos if token < width)
    if ending and eos:
        mask[torch.tensor(ending).unsqueeze(1), torch.tensor(eos).unsqueeze(0)] = True
    return mask


@functools.lru_cache(maxsize=1)
def _bit_shifts() -> Any:
    import torch

    return torch.arange(8, dtype=torch.uint8)


_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def _ll_tokenizer(tokenizer: Any, eos_token_ids: frozenset[int]) -> Any:
    """llguidance's view of an enigma tokenizer (its tokenizer.json), made once per tokenizer."""
    import llguidance

    with _tokenizers_lock:
        made = _tokenizers.get(tokenizer)
        if made is None:
            eos = sorted(eos_token_ids) or None
            made = llguidance.LLTokenizer(tokenizer.backend_json(), n_vocab=tokenizer.vocab_size,
                                          eos_token=eos[0] if eos else None)
            _tokenizers[tokenizer] = made
        return made
