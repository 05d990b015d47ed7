"""Tokenizers between GGUF metadata and ``tokenizers.Tokenizer``, both ways, as llama.cpp reads them.

Two vocabularies, as llama.cpp names them in ``tokenizer.ggml.model``:

- ``gpt2``: byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM). The tokens, the
  merges, and a pre-tokenizer chosen by ``tokenizer.ggml.pre`` — a list of
  regular expressions that llama.cpp applies one after the other to the
  pieces the previous one left (``llama-vocab.cpp``), which is a sequence of
  ``Split(..., "isolated")`` in ``tokenizers``; then the byte-to-unicode map.
  ``default`` is *not* GPT-2's split: it first cuts runs of punctuation.
- ``llama``: SentencePiece BPE (Llama 2, Mistral, TinyLlama). Tokens and
  scores, no merges: llama.cpp repeatedly joins the adjacent pair whose
  concatenation is the highest-scoring token, which is BPE whose merge ranks
  follow the merged token's score; unknown characters fall back to the
  ``<0xXX>`` byte tokens, and a ``▁`` is prepended when ``add_space_prefix``.

Token types (``tokenizer.ggml.token_type``): CONTROL tokens become special
tokens, USER_DEFINED ones added tokens, both keeping their ids.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from enigma.errors import NotAvailableError

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _llama3_upper(pattern: str) -> str:
    """tokenizer.json spells the contractions ``(?i:'s|...)``; llama.cpp's adapted form spells out the cases."""
    return pattern.replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)",
                           "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])")


PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
    "gpt-2": ((GPT2_SPLIT,), False),
    "llama-bpe": ((LLAMA3_SPLIT,), True),
    "qwen2": ((QWEN2_SPLIT,), False),
    "smollm": ((r"\p{N}", GPT2_SPLIT), False),
}
"""llama.cpp's pre-tokenizers by ``tokenizer.ggml.pre``: (regexes applied in turn, ignore_merges)."""
ALIASES = {"gpt2": "gpt-2", "phi-2": "gpt-2", "llama3": "llama-bpe", "llama-v3": "llama-bpe",
           "deepseek-r1-qwen": "qwen2"}


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def tokenizer_from_gguf(reader: Any, *, source: str = "GGUF file") -> Any:
    """The tokenizer of an open ``gguf.GGUFReader``."""
    model = _field(reader, "tokenizer.ggml.model")
    tokens = list(_field(reader, "tokenizer.ggml.tokens", []))
    if not tokens:
        raise NotAvailableError(f"{source} has no tokenizer (tokenizer.ggml.tokens); enigma needs the model's "
                                "vocabulary")
    types = list(_field(reader, "tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens)))
    if model == "gpt2":
        pre = _field(reader, "tokenizer.ggml.pre", "default")
        merges = list(_field(reader, "tokenizer.ggml.merges", []))
        return byte_level_bpe(tokens, types, merges, pre, source=source)
    if model == "llama":
        scores = list(_field(reader, "tokenizer.ggml.scores", [0.0] * len(tokens)))
        add_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
        return sentencepiece_bpe(tokens, types, scores, add_space_prefix=add_prefix)
    raise NotAvailableError(f"{source}: tokenizer.ggml.model {model!r} is not rebuilt yet; byte-level BPE (gpt2) "
                            "and SentencePiece (llama) are")


def byte_level_bpe(tokens: Sequence[str], types: Sequence[int], merges: Sequence[str], pre: str, *,
                   source: str = "GGUF file") -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` that splits as llama.cpp's pre-tokenizer ``pre``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    name = ALIASES.get(pre, pre)
    if name not in PRE_TOKENIZERS:
        raise NotAvailableError(f"{source}: pre-tokenizer {pre!r} is not ported yet; ported: "
                                f"{', '.join(sorted({*PRE_TOKENIZERS, *ALIASES}))}")
    regexes, ignore_merges = PRE_TOKENIZERS[name]
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    _add_typed_tokens(tokenizer, tokens, types)
    return tokenizer


def sentencepiece_bpe(tokens: Sequence[str], types: Sequence[int], scores: Sequence[float], *,
                      add_space_prefix: bool = True) -> Any:
    """A SentencePiece-BPE ``tokenizers.Tokenizer`` (byte fallback) from tokens and their scores."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {token: index for index, token in enumerate(tokens)}
    mergeable = {token: float(scores[index]) for index, token in enumerate(tokens)
                 if types[index] in (TOKEN_NORMAL, TOKEN_USER_DEFINED) and len(token) > 1}
    merges: list[tuple[float, int, int, str, str]] = []
    for piece, score in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[left], vocab[right], left, right))
    merges.sort()
    unknown = next((tokens[i] for i, kind in enumerate(types) if kind == TOKEN_UNKNOWN), None)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(left, right) for *_, left, right in merges],
                                     unk_token=unknown, fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Prepend(SPACE)] if add_space_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                           *([decoders.Strip(" ", 1, 0)] if add_space_prefix else [])])
    _add_typed_tokens(tokenizer, tokens, types)
    return tokenizer


def _add_typed_tokens(tokenizer: Any, tokens: Sequence[str], types: Sequence[int]) -> None:
    from tokenizers import AddedToken

    for index, kind in enumerate(types):  # in id order, so each keeps its own id
        if kind == TOKEN_CONTROL:
            tokenizer.add_special_tokens([AddedToken(tokens[index], special=True, normalized=False)])
        elif kind == TOKEN_USER_DEFINED:
            tokenizer.add_tokens([AddedToken(tokens[index], special=False, normalized=False)])


# ---------------------------------------------------------------- tokenizer.json -> GGUF


class GGUFVocabulary:
    """What ``tokenizer.ggml.*`` holds for a Hugging Face ``tokenizer.json``."""

    def __init__(self, model: str, tokens: list[str], types: list[int], *, pre: str | None = None,
                 scores: list[float] | None = None, add_space_prefix: bool | None = None) -> None:
        self.model, self.tokens, self.types, self.pre = model, tokens, types, pre
        self.scores, self.add_space_prefix = scores, add_space_prefix


def vocabulary_from_tokenizer_json(data: Mapping[str, Any], vocab_size: int, *, source: str) -> GGUFVocabulary:
    """The GGUF vocabulary of a parsed ``tokenizer.json``, padded to ``vocab_size`` entries."""
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise NotAvailableError(f"{source}: only BPE tokenizers (byte-level or SentencePiece-style) are written to "
                                f"GGUF yet; this one is {model.get('type')}")
    vocab: dict[str, int] = dict(model.get("vocab", {}))
    added = {token["content"]: token for token in data.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    if max(vocab.values()) >= vocab_size:
        raise NotAvailableError(f"{source} has {max(vocab.values()) + 1} tokens but the model's vocabulary "
                                f"(config.json vocab_size) is {vocab_size}; llama.cpp cannot load such a file")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [TOKEN_UNUSED] * vocab_size
    for content, index in vocab.items():
        tokens[index] = content
        if content in added:
            types[index] = TOKEN_CONTROL if added[content].get("special") else TOKEN_USER_DEFINED
        else:
            types[index] = TOKEN_NORMAL
    if model.get("byte_fallback"):
        return _sentencepiece_vocabulary(data, tokens, types, source=source)
    pre = _pre_tokenizer_name(data)
    if pre is None:
        raise NotAvailableError(f"{source}: its pre-tokenizer is none llama.cpp names (gpt-2, llama-bpe, qwen2, "
                                "smollm); it cannot be written to GGUF yet")
    return GGUFVocabulary("gpt2", tokens, types, pre=pre)


def _sentencepiece_vocabulary(data: Mapping[str, Any], tokens: list[str], types: list[int], *,
                              source: str) -> GGUFVocabulary:
    """SentencePiece-style BPE: scores from the merge ranks (earlier merge, higher score), bytes typed BYTE."""
    model = data["model"]
    normalizer = json.dumps(data.get("normalizer"), ensure_ascii=False)
    pre_tokenizer = json.dumps(data.get("pre_tokenizer"), ensure_ascii=False)
    if SPACE not in normalizer and SPACE not in pre_tokenizer:
        raise NotAvailableError(f"{source}: a byte-fallback BPE without SentencePiece's '▁' spaces is not written "
                                "to GGUF yet")
    merges = model.get("merges", [])
    rank = {}
    for index, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, index)
    floor = -float(len(merges) + 1)
    scores = [-float(rank[token]) if token in rank else floor for token in tokens]
    unknown = model.get("unk_token")
    for index, token in enumerate(tokens):
        if token == unknown:  # SentencePiece's own type, even when tokenizer.json lists it as added
            types[index] = TOKEN_UNKNOWN
        elif types[index] == TOKEN_NORMAL and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types[index] = TOKEN_BYTE
    prepends = '"Prepend"' in normalizer or '"prepend_scheme": "always"' in pre_tokenizer
    return GGUFVocabulary("llama", tokens, types, scores=scores, add_space_prefix=prepends)


def _pre_tokenizer_name(data: Mapping[str, Any]) -> str | None:
    """llama.cpp's name of a byte-level tokenizer.json's split, or None when it is none llama.cpp has."""
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = _llama3_upper((steps[0].get("pattern") or {}).get("Regex", ""))
        return {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}.get(pattern)
    return None
